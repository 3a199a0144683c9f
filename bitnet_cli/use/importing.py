"""Bringing in a model that bitnet did not train: `bitnet import SOURCE`.

SOURCE is a folder, or a Hugging Face hub id fetched with huggingface_hub. The layouts read
(safetensors only: a pickle checkpoint is refused, never loaded; import_config.py reads the
config.json, a config without architectures as its model_type's class):

    bitnet    transformers' BitNetForCausalLM (model_type bitnet): the released BitNet b1.58
              2B4T and bitnet's own `export hf` / `hf-packed`. Latent weights (quantization_mode
              online, as the -bf16 master weights), or uint8 codes four per byte along the output
              rows with a weight_scale (offline): with linear_class autobitlinear the scale is
              mean|W|, a multiplier; with bitlinear it is 1/mean|W|, a divisor.
    1bitllm   1bitLLM's BitnetForCausalLM (model_type llama): latent weights, the sub-norms named
              self_attn.inner_attn_ln and mlp.ffn_layernorm, SiLU, RoPE theta 10000 by default.
    llama     transformers' full-precision LlamaForCausalLM (Llama 2 and 3, TinyLlama, SmolLM):
              a --quant none run without sub-norms (sub_norms false), Llama 3's RoPE scaling
              where it has it, tied or untied head; what a Llama does not compute as bitnet does
              (biases, other RoPE scaling, a head_dim of its own, Qwen's and Gemma's extras) is
              refused.

The model becomes a run (runs/NAME, one checkpoint at step 0, the source's tokenizer.json)
that chat, eval, export, status and `train --from` take, at its 2-bit size: each ternary
projection is stored as packed codes and a weight_scale (nn/packed_weights.py's layout, the
2B4T release's own), latent weights quantized as BitNet does, the other tensors in the source's
dtype. 2B4T's run is about as big as its download. A Llama keeps every tensor in its float
dtype; the float engine runs it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from bitnet_cli.errors import BitnetError
from bitnet_cli.use.import_source import find_source, read_source


def import_model(source: str, name: str | None = None, argv: list[str] | None = None) -> Path:
    """The run made from SOURCE (see the module's docstring); nothing is written unless every
    check passes, and then the run appears whole."""
    from bitnet_cli.config.presets import PRESETS
    from bitnet_cli.config.reading import to_dict
    from bitnet_cli.config.settings import TrainConfig
    from bitnet_cli.store.checkpoint import LATEST, MODEL_FILE, TRAINER_FILE, step_dir_name
    from bitnet_cli.store.files import to_json, write_error
    from bitnet_cli.store.runs import CONFIG_FILE, TOKENIZER_FILE, StateFile, new_run_dir

    def check_name(run_name: str) -> str:
        # A run id as `train --name` takes it; the TrainConfig only checks it, nothing keeps it.
        TrainConfig(experiment=IMPORT_EXPERIMENT, size=IMPORTED_SIZE,
                    **PRESETS[IMPORT_EXPERIMENT].sizes["95M"].train, name=run_name).validate()
        return run_name
    if name is not None:
        check_name(name)  # a bad --name is refused before the source is read
    folder = find_source(source)
    run_name = check_name(name or _run_name(source, folder))
    imported = read_source(folder)
    config = imported.config
    # Where it came from as the user can fetch it again: the folder, or the hub id (not the
    # hub's cache folder).
    about = {**imported.about, **({} if Path(source).expanduser().is_dir() else {"source": source})}
    # trainer.json keeps the text experiment: chat, eval and train --from read text with it.
    trainer = {"step": 0, "experiment": IMPORT_EXPERIMENT, "model": to_dict(config),
               "stop_ids": imported.stop_ids, "imported": about,
               **({"chat": imported.chat.to_dict()} if imported.chat else {}),
               **({"sampling": imported.sampling} if imported.sampling else {})}
    with new_run_dir(IMPORT_EXPERIMENT, IMPORTED_SIZE, run_name) as (run_dir, run):
        checkpoint = run / "checkpoints" / step_dir_name(0)
        checkpoint.mkdir(parents=True)
        try:
            write_streamed(checkpoint / MODEL_FILE, imported.tensors)
            (checkpoint / TRAINER_FILE).write_text(to_json(trainer) + "\n")
            for folder_ in (checkpoint, run):
                (folder_ / TOKENIZER_FILE).write_text(imported.tokenizer.to_str())
        except OSError as e:
            raise BitnetError(f"cannot write the run: {write_error(e)}; nothing was written") from None
        (run / "checkpoints" / LATEST).write_text(checkpoint.name + "\n")
        StateFile(run).update(status="imported")
        (run / CONFIG_FILE).write_text(to_json(imported_config(run_dir.name, config, about, argv))
                                       + "\n")
    return run_dir


IMPORT_EXPERIMENT, IMPORTED_SIZE = "baseline", "imported"


def imported_config(run_id: str, config, about: dict, argv: list[str] | None) -> dict:
    """An imported run's config.json: its own kind, where it came from and its model, with no
    training section (it was never trained here; status, cost and resume go by "kind")."""
    import platform

    from bitnet_cli import __version__
    from bitnet_cli.config.reading import to_dict
    from bitnet_cli.store.runs import now_iso
    return {"run_id": run_id, "kind": "imported", "imported": about,
            "num_params": config.num_params(), "model": to_dict(config),
            "versions": {"bitnet": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "argv": argv or [], "created_at": now_iso()}


def _run_name(source: str, folder: Path) -> str:
    """The source's own name (a hub id's last part), as a run id may be written."""
    local = Path(source).expanduser().is_dir()
    base = folder.resolve().name if local else source.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "imported"


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "U8": torch.uint8}  # the names safetensors' headers give the dtypes written


def write_streamed(path: Path, tensors) -> None:
    """A safetensors file written a piece at a time, as `tensors` makes them (`shapes` and
    `dtypes`, safetensors' names, and `pieces(name)`: the tensor's rows in order): safetensors'
    own writer wants them all in memory at once. The format: the header's length (8 bytes,
    little-endian), the JSON header with each tensor's dtype, shape and byte range, then the
    bytes in that order."""
    names = sorted(tensors.shapes)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        itemsize = SAFETENSORS_DTYPES[tensors.dtypes[name]].itemsize
        size = itemsize * math.prod(tensors.shapes[name])
        header[name] = {"dtype": tensors.dtypes[name], "shape": list(tensors.shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            for piece in tensors.pieces(name):
                piece = piece.contiguous()
                if piece.dtype != SAFETENSORS_DTYPES[tensors.dtypes[name]]:
                    raise ValueError(f"{name} is {piece.dtype}, not {tensors.dtypes[name]}")
                f.write(memoryview(piece.reshape(-1).view(torch.uint8).numpy()))

