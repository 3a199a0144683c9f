"""Bringing in a BitNet model that bitnet did not train: `bitnet import SOURCE`.

SOURCE is a folder, or a Hugging Face hub id fetched with huggingface_hub. The layouts read
(safetensors only: a pickle checkpoint is refused, never loaded):

    bitnet    transformers' BitNetForCausalLM (model_type bitnet): the released BitNet b1.58
              2B4T and bitnet's own `export hf` / `hf-packed`. Latent weights (quantization_mode
              online, as the -bf16 master weights), or uint8 codes four per byte along the output
              rows with a weight_scale (offline): with linear_class autobitlinear the scale is
              mean|W|, a multiplier; with bitlinear it is 1/mean|W|, a divisor.
    1bitllm   1bitLLM's BitnetForCausalLM (model_type llama): latent weights, the sub-norms named
              self_attn.inner_attn_ln and mlp.ffn_layernorm, SiLU, RoPE theta 10000 by default.

The model becomes an ordinary run (runs/NAME, one checkpoint at step 0, the source's
tokenizer.json) that chat, eval, export and status take. Packed codes become latent weights
that BitNet's quantizer maps back to exactly those codes and that scale: W = codes * s / p,
p the layer's share of nonzero codes, so mean|W| = s.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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
    from bitnet_cli.tasks import load_experiment
    from bitnet_cli.training.setup import run_config

    folder = find_source(source)
    imported = read_source(folder)
    config = imported.config
    # The run's text experiment: FineWeb-Edu text, or --data when it is evaluated or trained on.
    train = TrainConfig(experiment=IMPORT_EXPERIMENT, size=IMPORTED_SIZE,
                        **{**PRESETS[IMPORT_EXPERIMENT].sizes["95M"].train, "steps": 1},
                        name=name or _run_name(source, folder))
    train.validate()
    trainer = {"step": 0, "experiment": IMPORT_EXPERIMENT, "model": to_dict(config),
               "stop_ids": imported.stop_ids, "imported": imported.about,
               **({"chat": imported.chat.to_dict()} if imported.chat else {})}
    with new_run_dir(IMPORT_EXPERIMENT, IMPORTED_SIZE, train.name) as (run_dir, run):
        checkpoint = run / "checkpoints" / step_dir_name(0)
        checkpoint.mkdir(parents=True)
        try:
            write_streamed(checkpoint / MODEL_FILE, imported.tensors)
        except OSError as e:
            raise BitnetError(f"cannot write the run: {write_error(e)}; nothing was written") from None
        (checkpoint / TRAINER_FILE).write_text(to_json(trainer) + "\n")
        imported.tokenizer.save(str(checkpoint / TOKENIZER_FILE))
        imported.tokenizer.save(str(run / TOKENIZER_FILE))
        (run / "checkpoints" / LATEST).write_text(checkpoint.name + "\n")
        StateFile(run).update(status="imported", step=0, total_steps=0)
        run_dir_config = run_config(run_dir.name, IMPORT_EXPERIMENT,
                                    load_experiment(IMPORT_EXPERIMENT), config, train, argv)
        (run / CONFIG_FILE).write_text(to_json({**run_dir_config,
                                                "imported": imported.about}) + "\n")
    return run_dir


IMPORT_EXPERIMENT, IMPORTED_SIZE = "baseline", "imported"


def _run_name(source: str, folder: Path) -> str:
    """The source's own name (a hub id's last part), as a run id may be written."""
    local = Path(source).expanduser().is_dir()
    base = folder.resolve().name if local else source.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "imported"


def write_streamed(path: Path, tensors) -> None:
    """A safetensors file of float32 tensors written one at a time, as `tensors` (a mapping
    with `shapes`) makes them: safetensors' own writer wants them all in memory at once, 9.6 GB
    for 2B4T. The format: the header's length (8 bytes, little-endian), the JSON header with
    each tensor's dtype, shape and byte range, then the bytes in that order."""
    names = sorted(tensors.shapes)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        size = 4 * math.prod(tensors.shapes[name])
        header[name] = {"dtype": "F32", "shape": list(tensors.shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            tensor = tensors[name].float().contiguous()
            f.write(memoryview(tensor.numpy()).cast("B"))
