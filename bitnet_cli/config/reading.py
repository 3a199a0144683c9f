"""Settings and run files read back from JSON: each field checked, and any fault one line that
names the file and says what to do. No torch: `status` reads runs through this."""

from __future__ import annotations

import dataclasses

from bitnet_cli.config.numbers import show, whole
from bitnet_cli.config.settings import ModelConfig, TrainConfig
from bitnet_cli.errors import BitnetError


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
