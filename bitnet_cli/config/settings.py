"""What a model and a training run are made of, checked field by field, and read back from JSON.

Plain dataclasses and dicts only: `status`, `plot`, `cost` and `--help` read this module, so it
must never import torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from bitnet_cli.config.numbers import check_whole, real, show, whole
from bitnet_cli.config.presets import PRESETS, check_experiment
from bitnet_cli.errors import BitnetError

QUANT_MODES = ("ternary", "none")
# The FFN's gate: relu2 is relu(gate)^2 * up (BitNet b1.58 2B4T); silu is silu(gate) * up, what
# every llama.cpp computes for its `bitnet` architecture (relu2 only one from 2026 on).
ACTIVATIONS = ("relu2", "silu")
DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_STEPS = 999_999_999  # checkpoint folder names hold nine digits
# numpy's default_rng takes any int >= 0 and torch.manual_seed up to 2**64 - 1: 32 bits suit both
MAX_SEED = 2**32 - 1
MAX_NAME = 100
RESERVED_NAMES = ("latest",)  # a selector, never a run id


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
    quant: str = "ternary"  # "ternary" (BitLinear) or "none" (the full-precision twin)
    activation: str = "relu2"  # runs from before the option have none: they are relu2

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
        if self.head_dim % 2:
            raise BitnetError(f"head dimension {self.head_dim} must be even for rotary embeddings")

    def num_params(self) -> int:
        """Parameter count without building the model (embeddings included, tied head counted once)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv
        mlp = 3 * d * f
        norms = 2 * d + d + f  # input/post norms, attn_sub_norm, ffn_sub_norm
        per_layer = attn + mlp + norms
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_hidden_layers * per_layer + d + head


# A CPU run this long or longer is compiled unless --no-compile says otherwise (see compiled.py).
COMPILE_MIN_STEPS = 2000


@dataclass
class TrainConfig:
    experiment: str
    size: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    grad_accum: int = 1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    eval_every: int = 250
    save_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 3
    device: str = "auto"
    compile: bool | None = None  # None: the rule in compiled.py (CUDA, or COMPILE_MIN_STEPS+ on CPU)
    name: str | None = None
    data: str | None = None
    vocab_size: int | None = None  # text experiments: size of the BPE trained on the data
    extended_at: list[int] = dataclasses.field(default_factory=list)  # see optim.lr_factor
    tensorboard: bool = False  # also write the metrics as TensorBoard event files
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
        if not isinstance(self.tensorboard, bool):
            raise BitnetError(f"tensorboard must be true or false, got {show(self.tensorboard)}")
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


def build_configs(experiment: str, size: str | None, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """The preset for (experiment, size) with every non-None override applied on top. The
    model's vocab_size is left 0: it is the tokenizer's, known once the data is prepared."""
    preset = check_experiment(experiment)
    size = size or preset.default_size
    if size not in preset.sizes:
        raise BitnetError(f"unknown size {size!r} for {experiment}; choose one of: "
                          f"{', '.join(preset.sizes)}")
    chosen = preset.sizes[size]
    # Model options given (not None) override ModelConfig's defaults; the rest are training's.
    model_options = {name: value for name in ("quant", "activation")
                     if (value := overrides.pop(name, None)) is not None}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - train_fields
    if unknown:
        raise TypeError(f"unknown training options: {sorted(unknown)}")
    train_kwargs = {**chosen.train, **{k: v for k, v in overrides.items() if v is not None}}
    if train_kwargs.get("data") is not None:  # resume and eval may run from another folder
        train_kwargs["data"] = str(Path(train_kwargs["data"]).expanduser().resolve())
    train = TrainConfig(experiment=experiment, size=size, **train_kwargs)
    train.validate()
    model = ModelConfig(vocab_size=0, max_position_embeddings=train.seq_len,
                        **model_options, **chosen.model)
    model.validate()
    return model, train


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def model_config_from_dict(data: dict, source="the run's config.json") -> ModelConfig:
    config = _from_dict(ModelConfig, data, source)
    if config.vocab_size < 1:
        raise BitnetError(f"{source} is damaged: vocab_size must be at least 1; {RESTORE}")
    return config


def train_config_from_dict(data: dict, source="the run's config.json") -> TrainConfig:
    return _from_dict(TrainConfig, data, source)


RESTORE = "restore it or remove the run"


def _from_dict(cls, data, source):
    """A validated `cls` from a JSON object read from `source`; any fault names `source`."""
    label = cls.__name__.removesuffix("Config").lower()
    if not isinstance(data, dict):
        raise BitnetError(f"{source} is damaged: its {label} settings are {show(data)}, "
                          f"not a JSON object; {RESTORE}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise BitnetError(f"{source} is damaged: its {label} settings have no "
                          f"{missing[0]!r}; {RESTORE}")
    config = cls(**{k: v for k, v in data.items() if k in fields})
    try:
        config.validate()
    except BitnetError as e:
        raise BitnetError(f"{source} is damaged: {e}; {RESTORE}") from None
    return config


# The kinds of value check_fields knows; a trailing '?' also allows absent or null.
FIELD_KINDS = {
    "count": (lambda v: whole(v) and v >= 0, "a whole number of 0 or more"),
    "pid": (lambda v: whole(v) and 0 < v < 2**31, "a process id"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "texts": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "a list of strings"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
}


def check_fields(data: dict, kinds: dict[str, str], source) -> None:
    """Each field of `data` named in `kinds` is of its kind, or a BitnetError naming `source`."""
    for name, kind in kinds.items():
        value = data.get(name)
        if value is None and kind.endswith("?"):
            continue
        test, what = FIELD_KINDS[kind.rstrip("?")]
        if name not in data:
            raise BitnetError(f"{source} is damaged: it has no {name!r}; {RESTORE}")
        if not test(value):
            raise BitnetError(f"{source} is damaged: {name!r} should be {what}, not "
                              f"{show(value)}; {RESTORE}")
