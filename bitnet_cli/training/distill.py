"""Distillation: a teacher model's outputs as extra targets for the one being trained
(`train --teacher RUN|CKPT`), as BitNet Distillation (arXiv 2510.13998) trains a ternary model
from its full-precision source.

    loss = cross-entropy + weight * KL(teacher || student)                  at temperature T
         + attention_weight * KL(teacher's || student's attention relations)  on one layer

Both models read the same batch. The teacher runs without gradients, in eval mode, under the
training's autocast, and is never saved: the run records its checkpoint folder, and a resume
loads it again (a teacher gives the same logits every time, so a resume stays bit-exact).
As BitDistill writes it: no T^2 (Hinton et al.'s scaling). With it, weight 10 at T 5 is 250x
the KL, and on prose (README: "Make a ternary model") the student then kept to its teacher's
loss where the same conversion without one went below it; without it, it beat both. The
attention term is MiniLM's relations, as BitDistill uses them: for each of the layer's
queries, keys and values, split into heads, softmax(A A^T / sqrt(d)) over the earlier
positions, the teacher's and the student's compared row by row; BitDistill picks one late layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.tasks.problems import IGNORE
from bitnet_cli.report.run_cost import checkpoint_model
from bitnet_cli.training.fine_tune import load_source_weights


class Teacher:
    """The teacher, loaded once from its checkpoint, and the distillation terms of a micro-step."""

    def __init__(self, cfg, student_config, device: torch.device):
        # Checked with its tokenizer when the run was made: its model and weights are all it takes.
        self.model = BitNetForCausalLM(checkpoint_model(cfg.teacher))
        load_source_weights(self.model, cfg.teacher, role="the teacher")
        self.model.to(device).eval().requires_grad_(False)
        self.weight, self.temperature = cfg.distill_weight, cfg.distill_temperature
        self.attention_weight = cfg.distill_attention_weight
        self.layer = cfg.distill_layer
        self.heads = relation_heads(student_config)
        self.kept: dict[str, tuple] = {}  # a layer's q, k, v, as the hooks saw them
        self.logged = torch.zeros(2, device=device)  # the two terms, this step's micro-steps

    def watch(self, student: torch.nn.Module) -> None:
        """With an attention term, keep the chosen layer's q, k, v of both models each pass."""
        if self.layer is None:
            return

        def keeper(name):
            def keep(module, _inputs, out):
                if module.training or name == "teacher":  # not the student's evaluations
                    self.kept[name] = out
            return keep

        for name, model in (("student", student), ("teacher", self.model)):
            model.model.layers[self.layer].self_attn.qkv.register_forward_hook(keeper(name))

    def added_loss(self, inputs, logits, labels, targets, autocast) -> torch.Tensor:
        """The distillation terms of a micro-step whose student `logits` loop.micro_step has
        made, divided by `targets` as its cross-entropy is."""
        with torch.no_grad(), autocast():
            teacher_logits = self.model(inputs)
        kept = labels != IGNORE
        soft = self.weight * soft_target_loss(
            logits[kept], teacher_logits[kept], self.temperature) / targets
        relations = torch.zeros((), device=logits.device)
        if self.layer is not None:
            student, teacher = self.kept.pop("student"), self.kept.pop("teacher")
            relations = self.attention_weight * sum(
                relation_loss(s, t, self.heads) for s, t in zip(student, teacher)) / targets
        self.logged += torch.stack([soft.detach(), relations.detach()])
        return soft + relations

    def new_step(self) -> None:
        self.logged.zero_()

    def log_columns(self, grad_accum: int, sum_over_ranks) -> dict:
        """This step's terms, as the train row's loss is this step's (every rank calls this)."""
        soft, relations = (sum_over_ranks(self.logged) / grad_accum).tolist()
        return {"distill_loss": soft, **({"relation_loss": relations} if self.layer is not None
                                         else {})}


def soft_target_loss(logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """KL(teacher || student) at `temperature`, summed over the rows (one per target token)."""
    log_student = F.log_softmax(logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="sum", log_target=True)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, heads: int) -> torch.Tensor:
    """KL between the teacher's and the student's relations of one state (q, k or v: B, T, d),
    each head's T x T softmax(A A^T / sqrt(d)) over positions up to each row's, per row."""
    def log_relations(states: torch.Tensor) -> torch.Tensor:
        B, T, d = states.shape
        a = states.float().view(B, T, heads, d // heads).transpose(1, 2)
        scores = a @ a.transpose(-1, -2) / math.sqrt(d // heads)
        causal = torch.ones(T, T, dtype=torch.bool, device=states.device).tril()
        return F.log_softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    log_s, log_t = log_relations(student), log_relations(teacher.detach())
    terms = (log_t.exp() * (log_t - log_s)).nan_to_num(0.0)  # masked entries are 0 * (inf - inf)
    return terms.sum(-1).mean(1).sum()  # each row's KL, mean over heads, summed over positions


def check_teacher(teacher, model, tokenizer, cfg) -> None:
    """The teacher (a fine_tune.Source) reads this run's data and speaks its vocabulary, and its
    layer cfg.distill_layer can be compared with the run's, or one line on why not."""
    where = f"the --teacher {teacher.checkpoint}"
    if cfg.name is not None and teacher.checkpoint.parent.parent.name == cfg.name:
        raise BitnetError(f"{where} is the run itself (--name {cfg.name}); name a run or "
                          "checkpoint to learn from")
    if teacher.tokenizer.to_str() != tokenizer.to_str():
        raise BitnetError(f"{where} has another tokenizer than this run's data; distillation "
                          "compares the two models token by token, so they must share one")
    if teacher.model.vocab_size != model.vocab_size:
        raise BitnetError(f"{where} has a vocabulary of {teacher.model.vocab_size}, this run "
                          f"{model.vocab_size}; they must be the same")
    if cfg.seq_len > teacher.model.max_position_embeddings:
        raise BitnetError(f"--seq-len {cfg.seq_len} is longer than the context of {where} "
                          f"({teacher.model.max_position_embeddings}): it cannot read the data")
    if cfg.distill_layer is not None:
        layers = min(model.num_hidden_layers, teacher.model.num_hidden_layers)
        if not -layers <= cfg.distill_layer < layers:
            raise BitnetError(f"--distill-layer {cfg.distill_layer}: the run and its teacher "
                              f"have {layers} layers in common (0 to {layers - 1}, or -1 the last)")
        heads = relation_heads(model)
        widths = (teacher.model.hidden_size, teacher.model.num_key_value_heads
                  * teacher.model.head_dim)
        if any(width % heads for width in widths):
            raise BitnetError(f"--distill-layer: the teacher's attention widths {widths} do not "
                              f"split into this run's {heads} relation heads")


def relation_heads(model) -> int:
    """How many heads the relations split q, k and v into: the run's key/value heads, which
    divide all three widths."""
    return model.num_key_value_heads
