"""`bitnet bench --2b4t`: decoding at the shape of the released BitNet b1.58 2B4T model.

Its 2.4B parameters would be 9.6 GB as a float32 model, so the model is never built that way:
it is made on the meta device, its tied embedding and output layer are one random float16
table, and the engine converts its ternary layers from random codes one group at a time, as
loading a checkpoint does. Speed does not depend on what the weights are. The
measurement runs in a fresh process, so that its peak memory is the model's alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

from bitnet_cli.bench.shapes import NEW_TOKENS, PROMPT_TOKENS
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.nn.bitlinear import BitLinear
from bitnet_cli.nn.int8 import HalfHead, to_int8
from bitnet_cli.nn.model import BitNetForCausalLM, RMSNorm, rope_tables
from bitnet_cli.nn.packed import to_packed

# hidden 2560, 30 layers, 20 query and 5 key/value heads of 128, FFN 6912, vocabulary 128256
SHAPE_2B4T = dict(vocab_size=128256, hidden_size=2560, num_hidden_layers=30,
                  num_attention_heads=20, num_key_value_heads=5, intermediate_size=6912,
                  rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
REPORTED_MS_PER_TOKEN = 29  # the 2B4T technical report's CPU decoding figure


class HalfEmbedding(nn.Module):
    """The token embedding read from a float16 table (the output layer's own), as float32."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


def build_2b4t(context: int) -> tuple[BitNetForCausalLM, str]:
    """The 2B4T shape with random weights, and the engine that runs it."""
    return build_from_codes(ModelConfig(max_position_embeddings=context, **SHAPE_2B4T))


def build_from_codes(config: ModelConfig) -> tuple[BitNetForCausalLM, str]:
    """A model of `config` made for decoding from random ternary codes, converted by the 2bit
    engine (the int8 engine's without the kernel) as loading converts a checkpoint: one layer
    group of weights at a time, never the whole model in float32."""
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
    model.lm_head = HalfHead(table)  # the engines keep a float16 head as it is

    def random_codes(layer: BitLinear) -> None:
        # Codes of -1, 0 and +1 as the weights: the engine's quantizer gives them back exactly.
        codes = torch.randint(-1, 2, tuple(layer.weight.shape), dtype=torch.int8,
                              generator=generator)
        layer.weight = nn.Parameter(codes.float(), requires_grad=False)
    engine = "2bit" if to_packed(model, load=random_codes) is None else "int8"
    if engine == "int8":
        to_int8(model, load=random_codes)
    return model.eval(), engine


_CHILD = """
import json, sys, torch
from contextlib import nullcontext
from bitnet_cli.bench.decode_speed import decode_rate
from bitnet_cli.bench.released_shape import build_2b4t
from bitnet_cli.bench.shapes import NEW_TOKENS, PROMPT_TOKENS
model, engine = build_2b4t(PROMPT_TOKENS + NEW_TOKENS)
prompt = list(range(1, PROMPT_TOKENS + 1))
decode_rate(model, prompt, nullcontext)
rate = max(decode_rate(model, prompt, nullcontext) for _ in range(2))
status = open("/proc/self/status").read() if sys.platform == "linux" else ""
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024 if "VmHWM:" in status else None
print(json.dumps({"engine": engine, "tok_per_s": rate, "peak_rss_bytes": peak}))
"""


def decode_2b4t() -> dict:
    """Tokens/s and ms/token of greedy decoding at the 2B4T shape, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(shape="BitNet b1.58 2B4T", threads=torch.get_num_threads(),
                  ms_per_token=1e3 / result["tok_per_s"], reported_ms_per_token=REPORTED_MS_PER_TOKEN,
                  prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS,
                  llama_cpp="not run: its GGUF is written from a float32 model, which this shape "
                            "is built without")
    return result
