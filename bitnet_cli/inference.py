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

from bitnet_cli.checkpoint import (MODEL_FILE, TRAINER_FILE, load_model_tensors, newest_loadable,
                                   read_checkpoint)
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
    checkpoint, (tensors, _, trainer) = find_checkpoint(selector)  # trainer.json checked there
    tokenizer_path = checkpoint / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise BitnetError(f"{checkpoint} has no {TOKENIZER_FILE}")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises plain Exceptions for a damaged file
        raise BitnetError(f"{tokenizer_path} is damaged ({str(e)[:80]}); restore it from the "
                          "run folder's copy") from None
    config = model_config_from_dict(trainer["model"], checkpoint / TRAINER_FILE)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise BitnetError(f"{tokenizer_path} has {tokenizer.get_vocab_size()} tokens, more than "
                          f"the model's {config.vocab_size}; it is not this model's tokenizer")
    # A model config far bigger than its tensors is damaged: say so before allocating it.
    if config.num_params() > sum(t.numel() for t in tensors.values()):
        raise BitnetError(f"checkpoint {checkpoint} does not fit its trainer.json: the model "
                          f"config has {config.num_params():,} parameters, the tensors fewer")
    model = BitNetForCausalLM(config)
    load_model_tensors(model, tensors)
    model.to(device).eval()
    note = None
    if engine == "int8":
        note = to_int8(model)
        if note is not None:
            engine, note = "float", f"int8 engine not used: {note}"
    return LoadedModel(model=model, tokenizer=tokenizer,
                       config=config, experiment=trainer["experiment"], checkpoint=checkpoint,
                       step=trainer.get("step", 0), engine=engine, engine_note=note)
