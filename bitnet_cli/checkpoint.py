"""Checkpoints as bytes on disk: safetensors for tensors, JSON for everything else, written atomically.

    checkpoints/step_000500/model.safetensors   the model's state dict (lm_head absent when tied)
    checkpoints/step_000500/optim.safetensors   AdamW moments, keyed by parameter name
    checkpoints/step_000500/trainer.json        step, data cursor, RNG states, model config
    checkpoints/step_000500/tokenizer.json      a copy of the run's tokenizer
    checkpoints/latest                          the name of the newest complete checkpoint

A checkpoint is written into `step_000500.partial/`, fsynced, renamed into place, and only then
named in `latest`; a crash at any instant leaves the previous checkpoint whole and current.
Loading never runs code: there is no pickle anywhere.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bitnet_cli.errors import BitnetError
from bitnet_cli.runs import read_json, write_json_atomic

MODEL_FILE, OPTIM_FILE, TRAINER_FILE, LATEST = (
    "model.safetensors", "optim.safetensors", "trainer.json", "latest")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to store: contiguous CPU tensors, a tied lm_head left out."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise BitnetError(f"checkpoint does not fit the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")


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
    """Write one checkpoint atomically. A copy of the run's tokenizer goes in too, so that a
    checkpoint folder alone is enough to chat with, play, evaluate or export the model."""
    final = checkpoints / step_dir_name(step)
    partial = checkpoints / (final.name + ".partial")
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        save_file(model_tensors(model), str(partial / MODEL_FILE), metadata={"format": "pt"})
        save_file(optimizer_tensors(model, optimizer), str(partial / OPTIM_FILE))
        write_json_atomic(partial / TRAINER_FILE, trainer)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, partial / tokenizer.name)
        for name in (MODEL_FILE, OPTIM_FILE):
            _fsync(partial / name)
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(partial, final)
    except OSError as e:
        raise BitnetError(f"cannot write checkpoint {final.name} in {checkpoints}: "
                          f"{e.strerror or e}; the previous checkpoint is kept") from None
    _fsync_dir(checkpoints)
    latest = checkpoints / LATEST
    tmp = checkpoints / f".{LATEST}.tmp"
    tmp.write_text(final.name + "\n")
    os.replace(tmp, latest)
    _fsync_dir(checkpoints)
    _prune(checkpoints, keep)
    return final


def _prune(checkpoints: Path, keep: int) -> None:
    complete = sorted(p for p in checkpoints.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints_newest_first(checkpoints: Path) -> list[Path]:
    """Complete checkpoint folders, the one `latest` names first, then the rest newest first.
    `.partial` folders (a write that never finished) are never candidates."""
    complete = sorted((p for p in checkpoints.glob("step_*")
                       if p.is_dir() and not p.name.endswith(".partial")), reverse=True)
    pointer = checkpoints / LATEST
    named = checkpoints / pointer.read_text().strip() if pointer.is_file() else None
    if named in complete:
        complete.remove(named)
        complete.insert(0, named)
    return complete


def latest_checkpoint(checkpoints: Path) -> Path | None:
    candidates = checkpoints_newest_first(checkpoints)
    return candidates[0] if candidates else None


def newest_loadable(checkpoints: Path) -> tuple[Path | None, tuple | None, list[str]]:
    """The newest checkpoint that reads back whole: (path, its contents, why newer ones were
    skipped). (None, None, []) when there are none; an error when none of them can be read."""
    skipped = []
    for path in checkpoints_newest_first(checkpoints):
        try:
            return path, read_checkpoint(path), skipped
        except BitnetError as e:
            skipped.append(str(e))
    if skipped:
        raise BitnetError(f"no checkpoint in {checkpoints} can be read; the newest: {skipped[0]}")
    return None, None, []


def read_checkpoint(path: Path, with_optimizer: bool = True) -> tuple[dict, dict | None, dict]:
    """(model tensors, optimizer tensors or None, trainer.json) of a checkpoint folder."""
    try:
        model = load_file(str(path / MODEL_FILE))
        optim = load_file(str(path / OPTIM_FILE)) if with_optimizer else None
        trainer = read_json(path / TRAINER_FILE)
    except FileNotFoundError as e:
        raise BitnetError(f"checkpoint {path} is incomplete: {Path(e.filename).name} is missing") from None
    except Exception as e:  # safetensors and json raise several types for damaged files
        raise BitnetError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                          "it may be damaged") from None
    return model, optim, trainer
