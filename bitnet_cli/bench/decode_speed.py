"""Bench sections about decoding: every engine's tokens/s on the same prompt, llama.cpp on the
same weights, the BitLinear layers alone, the KV cache, and the packed size on disk."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch
from torch import nn

from bitnet_cli.bench.shapes import NEW_TOKENS, PROMPT_TOKENS, best_of, build
from bitnet_cli.nn.bitlinear import BitLinear
from bitnet_cli.nn.decoding import DecodeStep
from bitnet_cli.nn.half_head import HalfHead
from bitnet_cli.nn.int8 import Int8Linear, to_int8
from bitnet_cli.nn.kernel import ternary_ops
from bitnet_cli.nn.packed import ENGINE_LINEARS, PackedLinear, to_packed
from bitnet_cli.nn.model import BitNetForCausalLM, generate

DECODE_SHAPES = [("arithmetic", "5M"), ("tinystories", "12M"), ("baseline", "95M")]
LLAMA_CPP_SHAPE = ("baseline", "95M")  # rows of 768 and 3072: every projection TQ2_0
LLAMA_CPP_CONTEXT = 256


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: every projection, the head, one embedding row
    (norms are too small to count)."""
    config = model.config
    linear = sum(linear_bytes(m) for m in model.modules()
                 if isinstance(m, (BitLinear, *ENGINE_LINEARS)) and m is not model.lm_head)
    head = model.lm_head
    if isinstance(head, Int8Linear):
        head_bytes = linear_bytes(head)
    else:
        head_bytes = head.weight.numel() * (2 if isinstance(head, HalfHead) else 4)
    return linear + head_bytes + 4 * config.hidden_size


def decode_rate(model, prompt: list[int], context, step=None) -> float:
    """Tokens/s of greedy decoding with the KV cache, after the prompt's forward pass."""
    with context():
        stream = generate(model, prompt, NEW_TOKENS, step=step)
        next(stream)  # the prompt itself is not timed
        start = time.perf_counter()
        count = sum(1 for _ in stream)
        return count / (time.perf_counter() - start)


STEP_PARTS = ("ternary sums", "head", "attention", "rest")  # decode_step.cpp's step_profile


def step_parts(model, prompt: list[int], step: DecodeStep) -> dict:
    """Where a token's time goes in the fused step, in ms per token: the ternary projections
    (quantizing, sums, rescale), the head, attention (RoPE, the cache, attention itself), the
    rest (norms, residuals, the gate), and what is spent outside the step (sampling, Python)."""
    ops = step.forward.ops
    ops.step_profile()  # from zero
    rate = decode_rate(model, prompt, contextlib.nullcontext, step)
    *seconds, steps = ops.step_profile()
    parts = {name: 1e3 * s / steps for name, s in zip(STEP_PARTS, seconds)}
    parts["outside the step"] = max(0.0, 1e3 / rate - sum(parts.values()))
    return parts


# The engines decode() times: (name, engine, head, how each token is decoded), the float
# engine's two precisions added to these. The first is the CPU default. "fused" is the fused
# step (one call per token, fused_decode.FusedDecode), "per-op" the model's own forward in eager
# PyTorch (how both engines decoded before the fused step), "compiled" that forward compiled.
ENGINES = [("2bit", "2bit", "float16", "fused"), ("2bit, int8 head", "2bit", "int8", "fused"),
           ("2bit per-op", "2bit", "float16", "per-op"),
           ("2bit per-op compiled, int8 head", "2bit", "int8", "compiled"),
           ("int8", "int8", "float16", "fused"), ("int8, int8 head", "int8", "int8", "fused"),
           ("int8 per-op", "int8", "float16", "per-op"),
           ("int8 per-op, no kernel", "int8", "float16", "no kernel")]
# "no kernel" is what a machine without a C++ compiler decodes with (fbgemm's sums and head):
# timed where the kernel is built too, beside the float engine it is measured against.


def convert(model: BitNetForCausalLM, engine: str, head: str, kernel: bool = True) -> str | None:
    """Swap the model's layers for `engine`'s, as loading does (`kernel=False`: as it does
    where the 2-bit kernel is not built); why not, or None."""
    if engine == "2bit":
        return to_packed(model, head)
    return to_int8(model, head, ops=ternary_ops()[0] if kernel else None)


def decode(experiment: str, size: str, with_llama_cpp: bool = False) -> dict:
    """Tokens/s of every engine on one shape, the same prompt and number of new tokens for
    each; with_llama_cpp adds llama.cpp on the same weights (exported as GGUF)."""
    model = build(experiment, size, PROMPT_TOKENS + NEW_TOKENS).eval()
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_TOKENS,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    engines = {"float32": (model, contextlib.nullcontext, None),
               "bf16 autocast": (model, bf16, None)}
    notes = []
    for name, engine, head, how in ENGINES:
        if how == "no kernel" and ternary_ops()[0] is None:
            continue  # the int8 per-op row is that already
        fast = build(experiment, size, PROMPT_TOKENS + NEW_TOKENS).eval()
        why = convert(fast, engine, head, kernel=how != "no kernel")
        if why:
            notes.append(f"no {engine} engine: {why}")
            continue
        step = DecodeStep(fast, how == "compiled", notes.append, fused=how == "fused")
        step.warm_up()
        if how == "compiled" and step.forward is fast:
            continue  # no compiler here: said in notes
        if how == "fused" and not step.fused:
            notes.append(f"no fused {engine} step: {ternary_ops()[1]}")
            continue
        engines[name] = (fast, contextlib.nullcontext, step)
    rates = {name: 0.0 for name in engines}
    for name, (m, context, step) in engines.items():
        decode_rate(m, prompt, context, step)  # warm-up: kernels chosen, float weights quantized once
    for _ in range(2):
        for name, (m, context, step) in engines.items():
            rates[name] = max(rates[name], decode_rate(m, prompt, context, step))
    result = {"shape": f"{experiment} {size}", "params": model.num_params(),
              "threads": torch.get_num_threads(), "notes": sorted(set(notes)), "engines": {}}
    for name, (m, _, step) in engines.items():
        read = weight_bytes(m)
        result["engines"][name] = {"tok_per_s": rates[name], "ms_per_token": 1e3 / rates[name],
                                   "vs_float32": rates[name] / rates["float32"],
                                   "vs_int8": rates[name] / rates["int8 per-op"],
                                   "weight_bytes_per_token": read, "gb_s": read * rates[name] / 1e9}
        if step is not None and step.fused:
            result["engines"][name]["parts_ms"] = step_parts(m, prompt, step)
    # bf16 autocast reads the fp32 weights, then writes and reads a bf16 copy of each: its
    # bytes per token are not the weights' size, so no GB/s is claimed for it.
    result["engines"]["bf16 autocast"]["gb_s"] = None
    result["layers"] = layers(model, {name: engines[f"{name} per-op"][0] for name in ("int8", "2bit")
                                      if f"{name} per-op" in engines})
    if with_llama_cpp:
        result["llama_cpp"] = llama_cpp_decode(model, prompt)
        if "tok_per_s" in result["llama_cpp"]:
            for name in engines:
                result["engines"][name]["vs_llama_cpp"] = rates[name] / result["llama_cpp"]["tok_per_s"]
    return result


def llama_cpp_decode(model: BitNetForCausalLM, prompt: list[int], state=None) -> dict:
    """llama.cpp's greedy decoding speed on `model`'s weights (or those `state` gives, as
    gguf_writer.write_gguf takes them), through llama-cpp-python: the model exported as bitnet's
    GGUF (TQ2_0 codes where rows are multiples of 256, F16 embedding), the same prompt, new
    tokens and thread count as bitnet's engines, timed the same way (after the prompt, best of
    three). The pinned llama.cpp computes silu(gate) * up for this architecture: the same work
    as relu2, so the speed compares even though the FFN differs."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"missing": "not installed (pip install llama-cpp-python)"}
    import tempfile
    from pathlib import Path

    from bitnet_cli.tasks import load_experiment
    from bitnet_cli.use.gguf_writer import GGUF_FILE, write_gguf
    from bitnet_cli.use.loading import LoadedModel

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench" / "checkpoints" / "random"  # the GGUF is named after the run
        folder.mkdir(parents=True)
        # Any tokenizer will do: the prompt goes in as token ids (the rest of the vocabulary is
        # written as unused entries).
        tokenizer = load_experiment("arithmetic").tokenizer()
        # llama-cpp-python makes a context of at least 256 and warns on stderr when the file
        # declares less; the context does not change the speed of the first 64 tokens.
        config = dataclasses.replace(model.config, max_position_embeddings=LLAMA_CPP_CONTEXT)
        write_gguf(LoadedModel(model, tokenizer, config, "arithmetic", folder, 0), folder, state)
        gguf_bytes = (folder / GGUF_FILE).stat().st_size
        llm = Llama(model_path=str(folder / GGUF_FILE), n_ctx=LLAMA_CPP_CONTEXT,
                    n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        def rate() -> float:
            llm.reset()
            llm.eval(prompt)
            start = time.perf_counter()
            for _ in range(NEW_TOKENS - 1):  # as decode_rate: the first token is the prompt's
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            return (NEW_TOKENS - 1) / (time.perf_counter() - start)
        rate()
        best = max(rate() for _ in range(3))
    finally:
        llm.close()
    import llama_cpp
    return {"tok_per_s": best, "threads": threads, "gguf_bytes": gguf_bytes,
            "version": llama_cpp.__version__}


@torch.inference_mode()
def layers(model: BitNetForCausalLM, fast: dict[str, BitNetForCausalLM], repeats: int = 20) -> dict:
    """One token through every BitLinear in model order, float (quantized fp32 weights, as the
    float engine keeps them) against each fast engine's: the matmuls with their quantization
    and rescale, in ms and in GB/s of the weights each reads."""
    engines = {"float": [m for m in model.modules() if isinstance(m, BitLinear)]}
    for name, m in fast.items():  # q, k, v stacked; gate, up
        engines[name] = [layer for layer in m.modules() if isinstance(layer, ENGINE_LINEARS)]

    def run(modules):
        inputs = [torch.randn(1, 1, m.in_features) for m in modules]
        return lambda: [[m(x) for m, x in zip(modules, inputs)] for _ in range(repeats)]
    t = best_of({name: run(modules) for name, modules in engines.items()}, 3)
    result = {"count": len(engines["float"])}
    for name, modules in engines.items():
        read = sum(linear_bytes(m) for m in modules)
        result[name] = {"ms": 1e3 * t[name] / repeats, "gb_s": read * repeats / t[name] / 1e9,
                        "vs_float": t["float"] / t[name]}
    return result


def linear_bytes(layer: nn.Module) -> int:
    """Bytes of one layer's weights as its engine stores them."""
    if isinstance(layer, PackedLinear):
        return layer.packed.numel()
    if isinstance(layer, Int8Linear):  # a byte a code, as an int8 tensor or in fbgemm's layout
        return layer.out_features * layer.in_features
    return 4 * layer.weight.numel()


def checkpoint_size(experiment: str, size: str) -> dict:
    from bitnet_cli.use.export import linear_weight_bytes
    with torch.device("meta"):
        model = build(experiment, size, 8)
    latent, packed = linear_weight_bytes(model)
    rest = 4 * (model.num_params() - sum(m.weight.numel() for m in model.modules()
                                         if isinstance(m, BitLinear)))
    return {"shape": f"{experiment} {size}", "latent_bytes": latent, "packed_bytes": packed,
            "ratio": latent / packed, "other_bytes": rest,
            "file_ratio": (latent + rest) / (packed + rest)}


def kv_cache(experiment: str = "tinystories", size: str = "12M", new_tokens: int = 128) -> dict:
    """Tokens/s of greedy decoding (the CPU default engine: 2bit, else int8) with and without
    the KV cache: without it, every token re-runs the whole sequence so far."""
    model = build(experiment, size, PROMPT_TOKENS + new_tokens).eval()
    if convert(model, "2bit", "float16"):
        to_int8(model)
    prompt = list(range(PROMPT_TOKENS))
    t = best_of({"cache": lambda: list(generate(model, prompt, new_tokens)),
                 "none": lambda: list(generate(model, prompt, new_tokens, use_cache=False))}, 1)
    return {"shape": f"{experiment} {size}", "new_tokens": new_tokens,
            "ratio": t["none"] / t["cache"], "cache_tok_per_s": new_tokens / t["cache"],
            "no_cache_tok_per_s": new_tokens / t["none"]}
