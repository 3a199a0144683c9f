"""A run's configuration made from its experiment's preset and the flags given: what `train`
checks before anything is written. No torch (`cost` and `--help` read it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bitnet_cli.config.presets import check_experiment
from bitnet_cli.config.settings import MODEL_OPTIONS, ModelConfig, TrainConfig
from bitnet_cli.errors import BitnetError


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
    model_options = {name: value for name in MODEL_OPTIONS
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
