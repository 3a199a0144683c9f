"""`bitnet bench --2b4t`: decoding at the shape of the released BitNet b1.58 2B4T model.

Its 2.4B parameters would be 9.6 GB as a float32 model, so the model is never built that way:
it is made on the meta device, its tied embedding and output layer are one random float16
table, and the engine converts its ternary layers from random codes one group at a time, as
loading a checkpoint does. Speed does not depend on what the weights are. The
measurement runs in a fresh process, so that its peak memory is the model's alone; llama.cpp
runs in another, on a GGUF of the same shape written from random codes a tensor at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping

import torch
from torch import nn

from bitnet_cli.bench.shapes import NEW_TOKENS, PROMPT_TOKENS
from bitnet_cli.config.presets import RELEASED_SHAPES
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import first_line
from bitnet_cli.nn.bitlinear import BitLinear
from bitnet_cli.nn.half_head import HalfEmbedding, HalfHead
from bitnet_cli.nn.int8 import Int8Linear, to_int8
from bitnet_cli.nn.kernel import ternary_ops
from bitnet_cli.nn.model import BitNetForCausalLM, RMSNorm, rope_tables
from bitnet_cli.nn.packed import to_packed

# hidden 2560, 30 layers, 20 query and 5 key/value heads of 128, FFN 6912, vocabulary 128256
SHAPE_2B4T = RELEASED_SHAPES["2b4t"]["model"]
REPORTED_MS_PER_TOKEN = 29  # the 2B4T technical report's CPU decoding figure


def config_2b4t(context: int) -> ModelConfig:
    return ModelConfig(**{**SHAPE_2B4T, "max_position_embeddings": context})


def build_2b4t(context: int, head: str = "float16") -> tuple[BitNetForCausalLM, str]:
    """The 2B4T shape with random weights, and the engine that runs it."""
    return build_from_codes(config_2b4t(context), head)


def build_from_codes(config: ModelConfig, head: str = "float16") -> tuple[BitNetForCausalLM, str]:
    """A model of `config` made for decoding from random ternary codes, converted by the 2bit
    engine (the int8 engine's without the kernel) as loading converts a checkpoint: one layer
    group of weights at a time, never the whole model in float32. The output layer is the
    float16 table, or (head="int8") random int8 rows of its shape."""
    ops = ternary_ops()[0]  # built and checked before the table exists: its peak stays 1.8 GB
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    model.rope_cos, model.rope_sin = rope_tables(config, config.max_position_embeddings)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight = nn.Parameter(torch.ones(module.weight.shape))
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(config.vocab_size, config.hidden_size, generator=generator,
                        dtype=torch.float16).mul_(0.02)
    model.model.embed_tokens = HalfEmbedding(table)
    model.lm_head = HalfHead(table, ops)  # the engines keep a float16 head as it is

    def random_codes(layer: BitLinear) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(-1, 2, tuple(layer.weight.shape), dtype=torch.int8,
                              generator=generator), torch.ones(()))
    # head="float32" leaves the output layer made above as it is
    engine = "2bit" if to_packed(model, "float32", weights_of=random_codes) is None else "int8"
    if engine == "int8":
        to_int8(model, "float32", weights_of=random_codes)
    if head == "int8":  # --head int8's layout: a row of int8 codes and a scale per word
        codes = torch.cat([torch.randint(-127, 128, tuple(part.shape), dtype=torch.int8,
                                         generator=generator)
                           for part in table.split(HalfHead.SLICE)])  # no int64 table at once
        model.lm_head = Int8Linear(codes, torch.full((len(table),), 127 / 0.05), [len(table)])
        model.lm_head.ops = ops
    return model.eval(), engine


_CHILD = """
import json, sys, torch
from contextlib import nullcontext
from bitnet_cli.bench.decode_speed import decode_rate, step_parts, weight_bytes
from bitnet_cli.bench.released_shape import build_2b4t
from bitnet_cli.bench.shapes import NEW_TOKENS, PROMPT_TOKENS
from bitnet_cli.nn.decoding import DecodeStep
model, engine = build_2b4t(PROMPT_TOKENS + NEW_TOKENS, sys.argv[1])
step = DecodeStep(model, compile=False)
prompt = list(range(1, PROMPT_TOKENS + 1))
decode_rate(model, prompt, nullcontext, step)
rate = max(decode_rate(model, prompt, nullcontext, step) for _ in range(2))
parts = step_parts(model, prompt, step) if step.fused else None
status = open("/proc/self/status").read() if sys.platform == "linux" else ""
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024 if "VmHWM:" in status else None
print(json.dumps({"engine": engine + (", fused" if step.fused else ""), "tok_per_s": rate,
                  "weight_bytes_per_token": weight_bytes(model), "parts_ms": parts,
                  "peak_rss_bytes": peak}))
"""
HEADS = {"2bit": "float16", "2bit, int8 head": "int8"}  # the rows, and the head each one has


class RandomCodes(Mapping):
    """The 2B4T shape's tensors by name, made when asked, for gguf_writer.write_gguf: random
    ternary codes for the projections, a random float16 embedding, unit norms. One tensor at a
    time, so the file is written without a float32 model."""

    def __init__(self, config: ModelConfig):
        with torch.device("meta"):
            self.model = BitNetForCausalLM(config)
        self.shapes = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}
        self.generator = torch.Generator().manual_seed(0)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name == "model.embed_tokens.weight":
            return torch.randn(shape, generator=self.generator, dtype=torch.float16).mul_(0.02)
        if len(shape) == 1:
            return torch.ones(shape)
        return torch.randint(-1, 2, shape, generator=self.generator).float()

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


_LLAMA_CPP_CHILD = """
import json
from bitnet_cli.bench.decode_speed import llama_cpp_decode
from bitnet_cli.bench.released_shape import RandomCodes, config_2b4t
from bitnet_cli.bench.shapes import NEW_TOKENS, PROMPT_TOKENS
state = RandomCodes(config_2b4t(PROMPT_TOKENS + NEW_TOKENS))
print(json.dumps(llama_cpp_decode(state.model, list(range(1, PROMPT_TOKENS + 1)), state)))
"""


def decode_2b4t() -> dict:
    """Tokens/s and ms/token of greedy decoding at the 2B4T shape with each head, each in a
    fresh process; then llama.cpp on a GGUF of the same shape, in another."""
    result = {"shape": "BitNet b1.58 2B4T", "threads": torch.get_num_threads(),
              "reported_ms_per_token": REPORTED_MS_PER_TOKEN, "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": NEW_TOKENS, "engines": {}}
    for name, head in HEADS.items():
        row = _child(_CHILD, head)
        row.update(ms_per_token=1e3 / row["tok_per_s"],
                   gb_s=row["weight_bytes_per_token"] * row["tok_per_s"] / 1e9)
        result["engines"][name] = row
    try:
        result["llama_cpp"] = _child(_LLAMA_CPP_CHILD)
    except subprocess.CalledProcessError as e:  # out of memory or disk for its 1.2 GB GGUF
        lines = (e.stderr or "").strip().splitlines()
        result["llama_cpp"] = {"missing": f"did not run ({lines[-1] if lines else first_line(e)})"}
    if "tok_per_s" in result["llama_cpp"]:
        for row in result["engines"].values():
            row["vs_llama_cpp"] = row["tok_per_s"] / result["llama_cpp"]["tok_per_s"]
    return result


def _child(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
