"""Checkpoints as bytes on disk: safetensors for tensors, JSON for everything else, written atomically.

    checkpoints/step_000000500/model.safetensors  the model's state dict (lm_head absent when tied)
    checkpoints/step_000000500/optim.safetensors  AdamW moments, keyed by parameter name
    checkpoints/step_000000500/trainer.json       step, data cursor, RNG states, model config
    checkpoints/step_000000500/tokenizer.json     a copy of the run's tokenizer
    checkpoints/latest                            the name of the newest checkpoint

A checkpoint is written into a fresh hidden folder, fsynced file by file, renamed into place,
and only then named in `latest`; a crash at any instant leaves every earlier checkpoint whole.
Readers take the highest step on disk and skip a damaged one for the one before. Loading never
runs code: there is no pickle anywhere.
"""

from __future__ import annotations

import base64
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from bitnet_cli.config.reading import RESTORE, check_fields, model_config_from_dict
from bitnet_cli.config.presets import PRESETS
from bitnet_cli.errors import BitnetError, typed_first_line
from bitnet_cli.store.files import (atomic_folder, remove_leftovers, to_json, write_bytes_atomic,
                              write_error)
from bitnet_cli.store.runs import TOKENIZER_FILE, read_json

MODEL_FILE, OPTIM_FILE, TRAINER_FILE, LATEST = (
    "model.safetensors", "optim.safetensors", "trainer.json", "latest")


def step_dir_name(step: int) -> str:
    """Nine digits: names sort by number up to the largest --steps there is (999,999,999)."""
    return f"step_{step:09d}"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to store: contiguous CPU tensors, a tied lm_head left out."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_model_tensors(model: torch.nn.Module, tensors: Mapping, assign: bool = False,
                       may_lack: tuple[str, ...] = ()) -> None:
    """The tensors into the model one at a time (copied, or with `assign` taken as its own), so a
    mapping that makes them when asked (packed latent weights) is never whole beside the model;
    names ending in `may_lack` may be absent. One line when they do not fit."""
    expected = {name for name in model.state_dict()
                if not (name.endswith(may_lack) and name not in tensors)}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected - {"lm_head.weight"})
    if missing or unexpected:
        raise BitnetError(f"checkpoint does not fit the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    for name in tensors:
        try:
            model.load_state_dict({name: tensors[name]}, strict=False, assign=assign)
        except RuntimeError as e:  # a tensor of the wrong shape
            why = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
            raise BitnetError(f"checkpoint does not fit the model: {why[:200]}") from None


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[id(param)]}.{key}"] = value.detach().to("cpu").contiguous()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        state = {key.rsplit(".", 1)[1]: value for key, value in tensors.items()
                 if key.rsplit(".", 1)[0] == name}
        if state:
            for key, value in state.items():
                if key != "step" and value.shape != param.shape:
                    raise BitnetError(f"the optimizer state of {name} has shape "
                                      f"{list(value.shape)}, but the parameter "
                                      f"{list(param.shape)}: it belongs to another model")
            # AdamW keeps `step` on the CPU unless it runs fused (then beside the parameter).
            on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
            optimizer.state[param] = {
                k: v.to(param.device) if k != "step" or on_device else v for k, v in state.items()}


def rng_state() -> dict:
    state = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def save_checkpoint(checkpoints: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer: dict, keep: int,
                    tokenizer: Path | None = None) -> Path:
    """Write one checkpoint whole or not at all (see files.atomic_folder), then name it in
    `latest` and prune the oldest beyond `keep`. A copy of the run's tokenizer goes in too, so
    that a checkpoint folder alone is enough to chat with, play, evaluate or export the model.
    Any write error is one line, and leaves the checkpoints that were there before."""
    final = checkpoints / step_dir_name(step)
    try:
        if checkpoints.is_symlink():
            raise BitnetError(f"{checkpoints} is a symbolic link; bitnet writes checkpoints only "
                              "inside the run folder (move the link away)")
        checkpoints.mkdir(parents=True, exist_ok=True)
        with atomic_folder(final, replace=True) as folder:
            save_file(model_tensors(model), str(folder / MODEL_FILE), metadata={"format": "pt"})
            save_file(optimizer_tensors(model, optimizer), str(folder / OPTIM_FILE))
            (folder / TRAINER_FILE).write_text(to_json(trainer) + "\n")
            if tokenizer is not None:
                shutil.copyfile(tokenizer, folder / tokenizer.name)
        write_bytes_atomic(checkpoints / LATEST, (final.name + "\n").encode())
    except (OSError, SafetensorError) as e:
        kept = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
        raise BitnetError(f"cannot write checkpoint {final.name} in {checkpoints}: "
                          f"{write_error(e)}; "
                          + (f"{kept.name} is kept" if kept else "there is no earlier checkpoint")
                          ) from None
    _prune(checkpoints, keep, final)
    return final


def _prune(checkpoints: Path, keep: int, newest: Path) -> None:
    """Delete all but the `keep` newest checkpoints (keep 0: none); never the one just written."""
    for old in checkpoints_newest_first(checkpoints)[keep:] if keep > 0 else []:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def remove_partial_saves(checkpoints: Path) -> None:
    """What a save killed mid-way left behind (called by the run's lock holder)."""
    for pattern in (".step_*", "step_*.partial", f".{LATEST}.*"):
        remove_leftovers(checkpoints, pattern)


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint folder's name gives (step_000500 -> 500), or None."""
    match = re.fullmatch(r"step_(\d+)", path.name)
    return int(match.group(1)) if match else None


def checkpoints_newest_first(checkpoints: Path) -> list[Path]:
    """Checkpoint folders on disk, the highest step first, by number. Only whole ones are ever
    under a step_N name (a save renames its folder into place last); `latest` is for people
    and other tools, and a crash between that rename and `latest` changes nothing here."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir()
             if checkpoint_step(p) is not None and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=checkpoint_step, reverse=True)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    candidates = checkpoints_newest_first(checkpoints)
    return candidates[0] if candidates else None


def newest_loadable(checkpoints: Path, for_resume: bool = True
                    ) -> tuple[Path | None, tuple | None, list[str]]:
    """The newest checkpoint that reads back whole: (path, its contents, why newer ones were
    skipped). (None, None, []) when there are none; an error when none of them can be read.
    Using a model needs less than resuming its training: no optimizer, data cursor or RNG."""
    skipped = []
    for path in checkpoints_newest_first(checkpoints):
        try:
            return path, read_checkpoint(path, with_optimizer=for_resume), skipped
        except BitnetError as e:
            skipped.append(str(e))
    if skipped:
        raise BitnetError(f"no checkpoint in {checkpoints} can be read; the newest: {skipped[0]}")
    return None, None, []


class ShapedTensors(Mapping):
    """Tensors made when asked for, named and counted by `shapes` (name -> shape), which a
    subclass sets: a loader reads their sizes without reading them."""

    shapes: dict[str, tuple[int, ...]]

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


class StoredTensors(ShapedTensors):
    """A model.safetensors whose tensors are read one at a time, when asked for: a model loaded
    for use never holds the whole float32 file in memory beside what it makes of it. The
    header (names, shapes, offsets, the file's length) is checked when this is made."""

    def __init__(self, file: Path):
        self.file = file
        self.shapes, self.dtypes = _read(file, lambda f: _header(f))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return _read(self.file, lambda f: _tensor(f, name))


def _header(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Each tensor's shape and dtype, as safetensors names them (F32, BF16, U8, ...)."""
    with safe_open(str(file), "pt") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}
        return ({name: tuple(s.get_shape()) for name, s in slices.items()},
                {name: s.get_dtype() for name, s in slices.items()})


def _tensor(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), "pt") as f:  # closed at once: the file's pages are not kept mapped
        return f.get_tensor(name)


def read_checkpoint(path: Path, with_optimizer: bool = True) -> tuple[dict, dict | None, dict]:
    """(model tensors, optimizer tensors or None, trainer.json) of a checkpoint folder, each
    file checked, its tokenizer.json too: what resuming or loading the model needs. Without the
    optimizer (a model for use), the model's tensors are StoredTensors, read when used."""
    for name in (MODEL_FILE, TRAINER_FILE, TOKENIZER_FILE) + ((OPTIM_FILE,) if with_optimizer else ()):
        if not (path / name).is_file():
            raise BitnetError(f"checkpoint {path} is incomplete: {name} is missing")
    if with_optimizer:
        model = _read(path / MODEL_FILE, lambda f: load_file(str(f)))
    else:
        model = StoredTensors(path / MODEL_FILE)
    optim = _read(path / OPTIM_FILE, lambda f: load_file(str(f))) if with_optimizer else None
    trainer = _read(path / TRAINER_FILE, read_json)
    _read(path / TOKENIZER_FILE, lambda f: Tokenizer.from_file(str(f)))
    check_trainer(trainer, path / TRAINER_FILE, for_resume=with_optimizer)
    return model, optim, trainer


def _read(file: Path, reader):
    try:
        return reader(file)
    except BitnetError:
        raise
    except Exception as e:  # safetensors and tokenizers raise several types for damaged files
        raise BitnetError(f"{file} cannot be read ({typed_first_line(e, 120)}); "
                          "it may be damaged") from None


MODEL_FIELDS = {"step": "count", "model": "object", "experiment": "text"}
RESUME_FIELDS = {"tokens": "count", "data": "object", "rng": "object", "nonfinite": "object?"}


def check_trainer(trainer: dict, source: Path, for_resume: bool = True) -> None:
    """trainer.json holds what loading the model (and, for_resume, continuing its training)
    needs, each of its kind; else one line."""
    check_fields(trainer, MODEL_FIELDS, source)
    if trainer["experiment"] not in PRESETS:
        raise BitnetError(f"{source} is damaged: unknown experiment {trainer['experiment'][:40]!r}; "
                          f"{RESTORE}")
    model_config_from_dict(trainer["model"], source)
    if not for_resume:
        return
    check_fields(trainer, RESUME_FIELDS, source)
    check_fields(trainer["data"], {"seed": "count", "rows": "count"}, f"{source} (data)")
    check_fields(trainer["rng"], {"torch": "text", "cuda": "texts?"}, f"{source} (rng)")
    check_fields(trainer.get("nonfinite") or {}, {"total": "count?", "in_a_row": "count?"},
                 f"{source} (nonfinite)")
    try:
        torch.Generator().set_state(_unb64(trainer["rng"]["torch"]))
        for text in trainer["rng"].get("cuda") or []:
            base64.b64decode(text, validate=True)
    except (ValueError, RuntimeError):  # not base64, or not a generator's state
        raise BitnetError(f"{source} is damaged: its random number state cannot be restored; "
                          f"{RESTORE}") from None
