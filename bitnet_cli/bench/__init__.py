"""Side-by-side measurements in one process, ratios first. Speed claims are shown here, never
asserted by timed tests. Random weights on the presets' shapes: speed and size do not depend
on what a model has learned.

    machine      the memory's read bandwidth (bitnet's own read loop on every thread): the limit
                 decoding runs into, since it reads every weight per token
    train_step   BitNet's forward + backward + AdamW step against its --quant none twin, eager
                 and compiled (on CUDA in bf16 autocast, with tokens/s and MFU)
    data         the CPU's time to make one batch, for every experiment and size
    decode       tokens/s with the KV cache: the 2bit and int8 engines (float16 or int8 head,
                 eager or a compiled decode step) against the float engine in fp32 and in bf16
                 autocast, and at 95M llama.cpp on the same weights; bytes of weights read per
                 token, the GB/s that makes and its share of the machine's; where a token's time
                 goes in the fused step (ternary sums, head, attention, the rest)
    layers       the BitLinear matmuls alone at decode shape (one token), float against int8
                 and 2bit
    size         bytes of the projection weights, fp32 latent against 2-bit packed (hf-packed)
    memory       peak RSS of a fresh process that decodes, or that trains, on the 95M shape
    kv_cache     decoding with the KV cache against re-running the whole sequence per token
    2b4t         (--2b4t) decoding at the released BitNet b1.58 2B4T's shape, random 2-bit codes
    serve        (--serve) `bitnet serve` against llama-cpp-python's server on the same 95M
                 weights, 1, 4 and 8 concurrent streamed requests from the same clients:
                 aggregate tokens/s, time to the first token, each stream's tokens/s

`--only NAMES` runs just those sections (the machine's is always measured: the others' tables
name its threads and bandwidth).

Each timing is the best of a few runs after a warm-up run, and the alternatives take turns, so
a background hiccup hits both sides alike.
"""

from __future__ import annotations

import gc

import torch

from bitnet_cli.bench.released_shape import decode_2b4t
from bitnet_cli.bench.shapes import machine
from bitnet_cli.bench.decode_speed import (DECODE_SHAPES, LLAMA_CPP_SHAPE, checkpoint_size, decode,
                                       kv_cache)
from bitnet_cli.bench.serve_speed import serving
from bitnet_cli.bench.train_speed import CUDA_TRAIN_SHAPE, TRAIN_SHAPES, data, memory, train_step

# Every section's name, as --only and --json name it; 2b4t and serve run only when asked for.
SECTIONS = ("machine", "train_step", "data", "decode", "size", "memory", "kv_cache", "2b4t",
            "serve")


def run_all(progress=lambda what: None, device: str = "cpu", released: bool = False,
            serve: bool = False, only: set[str] | None = None) -> dict:
    """Every section on the CPU (with `released`, decoding at the 2B4T shape too; with `serve`,
    serving); on CUDA, the machine and the 95M training step (decoding on a GPU is not measured
    here yet). `only`: just those sections of SECTIONS, and the machine."""
    results = {}
    if device == "cuda":
        steps = [("machine", lambda: {"gpu": torch.cuda.get_device_name(),
                                      "torch": torch.__version__, "cuda": torch.version.cuda}),
                 ("train_step", lambda: [train_step(*CUDA_TRAIN_SHAPE, device="cuda")])]
    else:
        steps = [("machine", machine),
                 ("train_step", lambda: [train_step(*s) for s in TRAIN_SHAPES]),
                 ("data", data),
                 ("decode", lambda: [decode(*s, with_llama_cpp=s == LLAMA_CPP_SHAPE)
                                     for s in DECODE_SHAPES]),
                 ("size", lambda: [checkpoint_size(*s) for s in DECODE_SHAPES]),
                 ("memory", memory),
                 ("kv_cache", kv_cache)]
        steps += [("2b4t", decode_2b4t), ("serve", lambda: serving(progress))]
        wanted = {"2b4t": released, "serve": serve}
        steps = [(name, fn) for name, fn in steps
                 if ((name == "machine" or name in only) if only else wanted.get(name, True))]
    for name, fn in steps:
        progress(name)
        results[name] = fn()
        gc.collect()
    if "decode" in results:  # each engine's GB/s against what the machine's memory gives
        read = results["machine"]["read_gb_s"]
        for engine in (e for d in results["decode"] for e in d["engines"].values()):
            engine["share_of_read"] = engine["gb_s"] / read if engine["gb_s"] else None
    return results
