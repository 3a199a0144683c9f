"""Fine-tuning: a new run that starts from another model's weights (`train --from RUN|CKPT`),
an imported release or a run of bitnet's own.

The run takes the source's model whole (its shape, activation, RoPE and vocabulary) and reads
its data with the source's tokenizer: a text experiment encodes --data with it instead of
training a BPE, and an experiment with a fixed vocabulary must have the source's. The training
schedule is the chosen size's, with the peak learning rate a tenth of it unless --lr says
otherwise (the weights are already trained: a from-scratch peak would undo much of that). The
optimizer starts fresh. The latent weights are the source's; from packed codes (an imported
model) they are made when training starts, codes x scale (nn/packed_weights.py), so training
starts at the quantized point, and the run says so.

Conversion: `--quant ternary` from a full-precision source (a `--quant none` run, an imported
Llama) makes its ternary model from the same latent weights, BitLinear quantizing them from the
first step, with BitNet's sub-norms inserted as ones where the source has none (BitNet
Distillation's SubLN). Its peak learning rate is the size's own, the ternary recipe's, not a
tenth: the latent weights must move far enough to change their ternary codes, which is
training a ternary model, not fine-tuning one (on prose, 5% lower held-out loss: README).

The checkpoint folder is recorded in the run's config (init_from): until the run's first save,
a resume starts from it again, so the run is as reproducible as any other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bitnet_cli.config.reading import model_config_from_dict
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.packed_weights import ModelWeights
from bitnet_cli.store.checkpoint import TRAINER_FILE, load_model_tensors, read_checkpoint
from bitnet_cli.store.runs import TOKENIZER_FILE

FINE_TUNE_LR_DIVISOR = 10  # the size's peak learning rate over this, where --lr is not given


@dataclass
class Source:
    checkpoint: Path
    model: ModelConfig
    tokenizer: Tokenizer


def checkpoint_source(selector: str, role: str = "--from") -> Source:
    """The checkpoint `--from` (or `--teacher`, the `role`) names, with its model config and
    tokenizer, checked."""
    from bitnet_cli.store.selector import find_checkpoint
    try:
        path, (_, _, trainer), _ = find_checkpoint(selector)
    except BitnetError as e:
        raise BitnetError(f"{role} {selector}: {e}") from None
    model = model_config_from_dict(trainer["model"], path / TRAINER_FILE)
    return Source(path.resolve(), model, Tokenizer.from_file(str(path / TOKENIZER_FILE)))


def fine_tune_model(source: Source, given: dict, seq_len: int) -> ModelConfig:
    """The run's model: the source's, or with --quant ternary from a full-precision source, its
    ternary conversion (with BitNet's sub-norms, inserted where the source has none). Other
    model flags that contradict it are refused, in one line."""
    converting = converts(source.model, given.get("quant"))
    for name, value in given.items():
        theirs = getattr(source.model, name)
        if value is not None and value != theirs and not (converting and name == "quant"):
            raise BitnetError(f"--{name.replace('_', '-')} {value}: the model --from "
                              f"{source.checkpoint} has {name} {theirs}, and fine-tuning keeps "
                              "its model; leave the flag out")
    if seq_len > source.model.max_position_embeddings:
        raise BitnetError(f"--seq-len {seq_len} is longer than the context of the model --from "
                          f"{source.checkpoint} ({source.model.max_position_embeddings})")
    if converting:
        return dataclasses.replace(source.model, quant="ternary", sub_norms=True)
    return dataclasses.replace(source.model)


def converts(source: ModelConfig, quant: str | None) -> bool:
    """Whether a run --from this source with this --quant makes a ternary model of a
    full-precision one (the other way, latent weights are no full-precision model: refused)."""
    if quant == "none" and source.quant == "ternary":
        raise BitnetError("--quant none: the model --from is ternary, and its latent weights are "
                          "not a full-precision model; fine-tune it as it is (leave --quant out)")
    return quant == "ternary" and source.quant == "none"


def check_tokenizer(source_tokenizer: Tokenizer, task_tokenizer: Tokenizer, experiment: str) -> None:
    if source_tokenizer.to_str() != task_tokenizer.to_str():
        raise BitnetError(f"the model --from has another tokenizer than the {experiment} "
                          "experiment's fixed one; fine-tune it on a text experiment with --data")


def load_source_weights(model: torch.nn.Module, checkpoint: str,
                        role: str = "this run starts from") -> bool:
    """A source's weights into a fresh model (a run with no checkpoint of its own yet, or a
    teacher); whether any was stored as packed codes (then its latent weights are made of them
    here). Sub-norms a full-precision source has none of stay as the model made them: ones, as
    BitNet Distillation inserts them."""
    try:
        tensors, _, trainer = read_checkpoint(Path(checkpoint), with_optimizer=False)
        weights = ModelWeights(tensors)
        inserted = () if trainer["model"].get("sub_norms", True) else SUB_NORMS
        load_model_tensors(model, weights, may_lack=inserted)  # a tensor at a time, cast as copied
    except BitnetError as e:
        raise BitnetError(f"{role} {checkpoint}, which cannot be read now ({e}); restore it, or "
                          "start a new run") from None
    return bool(weights.packed)


SUB_NORMS = (".self_attn.attn_sub_norm.weight", ".mlp.ffn_sub_norm.weight")
