"""What a model and a training run are made of, checked field by field.

A field that `bitnet train` takes as a flag is declared with `option(help)`: the CLI derives the
flag, its type, its help and its default from the field, so each is written once, here.
Plain dataclasses only: `status`, `plot`, `cost` and `--help` read this module, so it must never
import torch.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass

from bitnet_cli.config.numbers import check_whole, real, show
from bitnet_cli.config.presets import PRESETS, check_experiment
from bitnet_cli.config.rope import check_rope_scaling
from bitnet_cli.errors import BitnetError

QUANT_MODES = ("ternary", "none")
# The FFN's gate: relu2 is relu(gate)^2 * up (BitNet b1.58 2B4T); silu is silu(gate) * up, what
# every llama.cpp computes for its `bitnet` architecture (relu2 only one from 2026 on).
ACTIVATIONS = ("relu2", "silu")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda or mps."
MAX_STEPS = 999_999_999  # checkpoint folder names hold nine digits
# numpy's default_rng takes any int >= 0 and torch.manual_seed up to 2**64 - 1: 32 bits suit both
MAX_SEED = 2**32 - 1
MAX_NAME = 100
DISTILLATION = "Distillation"  # the --help panel of --teacher and its settings
RESERVED_NAMES = ("latest",)  # a selector, never a run id


def option(help: str, flag: str | None = None, panel: str | None = None, **field_options):
    """A field that `bitnet train` offers as a flag (see train_options): --field-name, or
    `flag` where the field's name cannot be it; listed in its own `panel` of --help if given."""
    return dataclasses.field(metadata={"help": help, "flag": flag, "panel": panel},
                             **field_options)


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def train_options() -> list[tuple[dataclasses.Field, type]]:
    """The fields `bitnet train` takes as flags, with their types, in --help order: training's,
    then the model's."""
    return [(f, typing.get_type_hints(cls)[f.name]) for cls in (TrainConfig, ModelConfig)
            for f in dataclasses.fields(cls) if "help" in f.metadata]


def preset_default(field: dataclasses.Field):
    """What leaving out a flag means, for --help: the field's default where no preset sets the
    field, else None (each size's own value stands; `train --help` lists them)."""
    if any(field.name in size.train or field.name in size.model
           for preset in PRESETS.values() for size in preset.sizes.values()):
        return None
    return None if field.default is dataclasses.MISSING else field.default


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    quant: str = option("ternary (BitNet b1.58) or none (the full-precision twin with the same "
                        "names and shapes). With --from, the source's; ternary converts a "
                        "full-precision one.", default="ternary")
    # Runs from before the option have no activation: they are relu2.
    activation: str = option("The FFN gate: relu2, relu(gate)^2 * up as in BitNet b1.58 2B4T, or "
                             "silu, silu(gate) * up, which every llama.cpp computes (relu2 only "
                             "a 2026 one: see `bitnet export --help`).", default="relu2")
    sub_norms: bool = True  # RMSNorms before o_proj, down_proj; false: an imported Llama's
    rope_scaling: dict | None = None  # Llama 3's RoPE scaling (config/rope.py), or None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        shape = {"vocab_size": (self.vocab_size, 0, 2**20),  # 0: the tokenizer's, not known yet
                 "hidden_size": (self.hidden_size, 2, 2**16),
                 "num_hidden_layers": (self.num_hidden_layers, 1, 1024),
                 "num_attention_heads": (self.num_attention_heads, 1, 2**12),
                 "num_key_value_heads": (self.num_key_value_heads, 1, 2**12),
                 "intermediate_size": (self.intermediate_size, 1, 2**18),
                 "max_position_embeddings": (self.max_position_embeddings, 1, 2**20)}
        for name, (value, low, high) in shape.items():
            check_whole(name, value, low, high)
        for name, value in (("rope_theta", self.rope_theta), ("rms_norm_eps", self.rms_norm_eps),
                            ("initializer_range", self.initializer_range)):
            if not real(value) or value < 0 or (value == 0 and name != "initializer_range"):
                raise BitnetError(f"{name} must be a positive finite number, got {show(value)}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise BitnetError(f"tie_word_embeddings must be true or false, got "
                              f"{show(self.tie_word_embeddings)}")
        if self.quant not in QUANT_MODES:
            raise BitnetError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {show(self.quant)}")
        if self.activation not in ACTIVATIONS:
            raise BitnetError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got "
                              f"{show(self.activation)}")
        if self.hidden_size % self.num_attention_heads:
            raise BitnetError(
                f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise BitnetError(
                f"{self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.sub_norms is not True and (self.sub_norms is not False or self.quant == "ternary"):
            raise BitnetError(f"sub_norms must be true (false: a full-precision Llama's), got "
                              f"{show(self.sub_norms)}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.head_dim % 2:
            raise BitnetError(f"head dimension {self.head_dim} must be even for rotary embeddings")

    def num_params(self) -> int:
        """Parameter count without building the model (embeddings included, tied head counted once)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv
        mlp = 3 * d * f
        norms = 2 * d + (d + f if self.sub_norms else 0)  # input/post norms, attn/ffn sub-norms
        per_layer = attn + mlp + norms
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_hidden_layers * per_layer + d + head


# The ModelConfig fields `train` takes as flags (the rest of its flags are TrainConfig's).
MODEL_OPTIONS = [f.name for f in dataclasses.fields(ModelConfig) if "help" in f.metadata]

# A CPU run this long or longer is compiled unless --no-compile says otherwise (see compiled.py).
COMPILE_MIN_STEPS = 2000


@dataclass
class TrainConfig:
    experiment: str
    size: str = option("Model size preset: 'tiny' or the experiment's reference size (its "
                       "default).")
    steps: int = option("Optimizer steps in the run.")
    batch_size: int = option("Sequences per micro-batch.")
    seq_len: int = option("Tokens per sequence (also the model's context).")
    lr: float = option("Peak learning rate of the two-stage schedule.")
    grad_accum: int = option("Micro-batches per optimizer step.", default=1)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = option("Seed for initialisation and data; the same seed on CPU gives "
                       "bit-identical weights.", default=1337)
    eval_every: int = option("Evaluate on held-out data every K steps.", default=250)
    save_every: int = option("Write a checkpoint every K steps.", default=500)
    log_every: int = 10
    keep_checkpoints: int = 3
    device: str = option(DEVICE_HELP, default="auto")
    # None: the rule in compiled.py (CUDA, or COMPILE_MIN_STEPS+ steps on a CPU).
    compile: bool | None = option(
        f"torch.compile the training step (default: on for CUDA, and on a CPU for runs of "
        f"{COMPILE_MIN_STEPS}+ steps). Without a C++ compiler: one line, then eager training.",
        default=None)
    # A checkpoint folder, as `--from RUN|CKPT` resolved it when the run was made.
    init_from: str | None = option(
        "Fine-tune: start from the weights of this run or checkpoint folder (an imported model, "
        "say) instead of random ones. The model is its shape and the data is read with its "
        "tokenizer; the optimizer starts fresh, and the peak --lr defaults to a tenth of the "
        "size's. From packed codes (2B4T), training starts at the quantized point.",
        default=None, flag="--from")
    foreground: bool = option("Train at normal CPU priority, on every core. A CPU run "
                              "otherwise lowers its own (nice 19) and keeps to the cores other "
                              "programs leave free: alone it runs as fast, and a chat or other "
                              "work beside it gets the cores first, at its own speed.",
                              default=False)
    name: str | None = option("Run id to use instead of <experiment>-<size>-<timestamp>.",
                              default=None)
    data: str | None = option("Text experiments: local .txt, .jsonl or .parquet files (a 'text' "
                              "field), or a folder of them, instead of the hub data set.",
                              default=None)
    vocab_size: int | None = option("Text experiments: size of the byte-level BPE trained on the "
                                    "data.", default=None)
    extended_at: list[int] = dataclasses.field(default_factory=list)  # see optim.lr_factor
    tensorboard: bool = option("Also write the metrics as TensorBoard event files in "
                               "RUN/tensorboard (tensorboard --logdir RUN); needs pip install "
                               "'bitnet-cli[tensorboard]'.", default=False)
    teacher: str | None = option(
        "Distil: also learn the soft targets (logits) of this run or checkpoint folder on the "
        "same batches, as BitNet Distillation does (its vocabulary and tokenizer must be the "
        "run's). With --from a full-precision run and --quant ternary: a ternary model that "
        "keeps what its source knew.", default=None, panel=DISTILLATION)
    distill_weight: float = option("With --teacher: the weight of KL(teacher || student) "
                                   "beside cross-entropy; BitDistill's 10.",
                                   default=10.0, panel=DISTILLATION)
    distill_temperature: float = option("With --teacher: the softmax temperature T of both "
                                        "models' logits; BitDistill's 5.", default=5.0,
                                        panel=DISTILLATION)
    distill_layer: int | None = option("With --teacher: also match the attention relations of "
                                       "this layer (0-based; -1 the last), BitDistill's "
                                       "MiniLM term. Off by default.", default=None,
                                       panel=DISTILLATION)
    distill_attention_weight: float = 1.0  # the relation term's weight (per-row KL, mean)
    # Text experiments: the training tokens the run's data was prepared for, fixed when the run
    # is made, so that changing --steps later keeps its data, its window order and its cursor.
    data_tokens: int | None = None

    def validate(self) -> None:
        if not isinstance(self.experiment, str) or not isinstance(self.size, str):
            raise BitnetError(f"experiment and size must be names, got {show(self.experiment)} "
                              f"and {show(self.size)}")
        preset = check_experiment(self.experiment)
        counts = {
            "--steps": (self.steps, 1, MAX_STEPS),
            "--batch-size": (self.batch_size, 1, 2**20),
            "--seq-len": (self.seq_len, 1, 2**20),
            "--grad-accum": (self.grad_accum, 1, 2**20),
            "--eval-every": (self.eval_every, 1, MAX_STEPS),
            "--save-every": (self.save_every, 1, MAX_STEPS),
            "--log-every": (self.log_every, 1, MAX_STEPS),
            "--seed": (self.seed, 0, MAX_SEED),
            "warmup_steps": (self.warmup_steps, 0, MAX_STEPS),
            "keep_checkpoints": (self.keep_checkpoints, 0, 10**6),
        }
        for flag, (value, low, high) in counts.items():
            check_whole(flag, value, low, high)
        shortest = preset.min_seq_len
        if self.seq_len < shortest:
            raise BitnetError(f"--seq-len must be at least {shortest} for {self.experiment} (its "
                              f"examples need that much context), got {self.seq_len}")
        if self.vocab_size is not None:
            check_whole("--vocab-size", self.vocab_size, 257, 2**20)
        if self.data_tokens is not None:
            check_whole("data_tokens", self.data_tokens, 1, 2**62)
        for flag, value, low in (("--lr", self.lr, 0), ("grad_clip", self.grad_clip, 0)):
            if not real(value) or value <= low:
                raise BitnetError(f"{flag} must be a positive finite number, got {show(value)}")
        if not real(self.weight_decay) or self.weight_decay < 0:
            raise BitnetError(f"weight_decay must be a finite number of 0 or more, got "
                              f"{show(self.weight_decay)}")
        if not (isinstance(self.extended_at, list) and all(
                isinstance(m, int) and not isinstance(m, bool) and 0 < m < self.steps
                for m in self.extended_at) and self.extended_at == sorted(set(self.extended_at))):
            raise BitnetError(f"extended_at must be rising step numbers below --steps, got "
                              f"{show(self.extended_at)}")
        if self.device not in DEVICES:
            raise BitnetError(f"--device must be one of {', '.join(DEVICES)}, got {show(self.device)}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise BitnetError(f"compile must be true, false or null, got {show(self.compile)}")
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise BitnetError(f"init_from must be a checkpoint folder, got {show(self.init_from)}")
        if not isinstance(self.foreground, bool):
            raise BitnetError(f"foreground must be true or false, got {show(self.foreground)}")
        if not isinstance(self.tensorboard, bool):
            raise BitnetError(f"tensorboard must be true or false, got {show(self.tensorboard)}")
        if self.teacher is not None and not isinstance(self.teacher, str):
            raise BitnetError(f"teacher must be a checkpoint folder, got {show(self.teacher)}")
        for flag, value in (("--distill-weight", self.distill_weight), ("--distill-temperature",
                            self.distill_temperature), ("distill_attention_weight",
                                                        self.distill_attention_weight)):
            if not real(value) or value <= 0:
                raise BitnetError(f"{flag} must be a positive finite number, got {show(value)}")
        if self.distill_layer is not None:
            check_whole("--distill-layer", self.distill_layer, -1024, 1023)
        if self.data is not None and not isinstance(self.data, str):
            raise BitnetError(f"--data must be a path, got {show(self.data)}")
        if self.name is not None:
            if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*",
                                                                  self.name):
                raise BitnetError(f"--name {show(self.name)} may only use letters, digits, '.', "
                                  "'_' and '-', and must start with a letter or digit")
            if len(self.name) > MAX_NAME or self.name in RESERVED_NAMES:
                raise BitnetError(f"--name must be at most {MAX_NAME} characters and not "
                                  f"{' or '.join(map(repr, RESERVED_NAMES))}, got {show(self.name)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def data_budget(self) -> int:
        """The training tokens the text data holds: as the run was planned when it was made
        (a run from before data_tokens: its first planned total, which extensions keep)."""
        if self.data_tokens is not None:
            return self.data_tokens
        return (self.extended_at[:1] or [self.steps])[0] * self.tokens_per_step

    @property
    def text_vocab_size(self) -> int:
        """Text experiments: the size of the BPE trained on the data (--vocab-size or the preset's)."""
        return self.vocab_size or PRESETS[self.experiment].vocab_size
