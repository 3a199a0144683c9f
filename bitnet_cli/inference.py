"""Loading a trained model for use: from a run (id, prefix, 'latest', folder) or from a
checkpoint folder alone, which holds everything needed (weights, model config, tokenizer).

Two engines run it: `float`, the training maths in floating point (quantize, then multiply
floats), and `int8`, the same maths with integer matmuls (bitnet_cli/int8.py), the default on
CPU where it is several times faster."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bitnet_cli.checkpoint import MODEL_FILE, load_model_tensors, newest_loadable, read_checkpoint
from bitnet_cli.config import ModelConfig, model_config_from_dict
from bitnet_cli.errors import BitnetError
from bitnet_cli.int8 import ENGINES, to_int8
from bitnet_cli.model import BitNetForCausalLM
from bitnet_cli.runs import TOKENIZER_FILE, resolve_run


@dataclass
class LoadedModel:
    model: BitNetForCausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    experiment: str
    checkpoint: Path
    step: int
    engine: str = "float"  # the engine that runs it
    engine_note: str | None = None  # why it is not the engine asked for


def find_checkpoint(selector: str) -> tuple[Path, tuple]:
    """The checkpoint a RUN|CKPT argument names, read back whole."""
    path = Path(selector).expanduser()
    if (path / MODEL_FILE).is_file():
        return path, read_checkpoint(path, with_optimizer=False)
    run_dir = resolve_run(selector)
    found, contents, _ = newest_loadable(run_dir / "checkpoints")
    if found is None:
        raise BitnetError(f"run {run_dir.name} has no checkpoint yet; wait for its first save "
                          "or train it further")
    return found, contents


def load_model(selector: str, device: str | torch.device = "cpu",
               engine: str | None = None) -> LoadedModel:
    """The model a RUN|CKPT selector names, on `device`, run by `engine` ("int8" or "float";
    None picks int8 on CPU and float elsewhere, where bf16 autocast already has fast kernels)."""
    device = torch.device(device)
    if engine is None:
        engine = "int8" if device.type == "cpu" else "float"
    if engine not in ENGINES:
        raise BitnetError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    checkpoint, (tensors, _, trainer) = find_checkpoint(selector)
    if "model" not in trainer or "experiment" not in trainer:
        raise BitnetError(f"{checkpoint} was not written by bitnet (its trainer.json has no model "
                          "config)")
    tokenizer_path = checkpoint / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise BitnetError(f"{checkpoint} has no {TOKENIZER_FILE}")
    config = model_config_from_dict(trainer["model"])
    model = BitNetForCausalLM(config)
    load_model_tensors(model, tensors)
    model.to(device).eval()
    note = None
    if engine == "int8":
        note = to_int8(model)
        if note is not None:
            engine, note = "float", f"int8 engine not used: {note}"
    return LoadedModel(model=model, tokenizer=Tokenizer.from_file(str(tokenizer_path)),
                       config=config, experiment=trainer["experiment"], checkpoint=checkpoint,
                       step=trainer.get("step", 0), engine=engine, engine_note=note)
