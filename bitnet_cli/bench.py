"""Side-by-side measurements in one process, ratios first. Speed claims are shown here, never
asserted by timed tests. Random weights on the presets' shapes: speed and size do not depend
on what a model has learned.

    machine      memory bandwidth: the limit decoding runs into (it reads every weight per token)
    train_step   BitNet's forward + backward + AdamW step against its --quant none twin, eager
                 and compiled (on CUDA in bf16 autocast, with tokens/s and MFU)
    data         the CPU's time to make one batch, for every experiment and size
    decode       tokens/s with the KV cache: the int8 engine (float16 or int8 head, eager or a
                 compiled decode step) against the float engine in fp32 and in bf16 autocast,
                 and at 95M llama.cpp on the same weights; bytes of weights read per token and
                 the GB/s that makes
    layers       the BitLinear matmuls alone at decode shape (one token), float against int8
    size         bytes of the projection weights, fp32 latent against 2-bit packed (hf-packed)
    memory       peak RSS of a fresh process that decodes, or that trains, on the 95M shape
    kv_cache     decoding with the KV cache against re-running the whole sequence per token

Each timing is the best of a few runs after a warm-up run, and the alternatives take turns, so
a background hiccup hits both sides alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from bitnet_cli.bitlinear import BitLinear, quantized_for_step
from bitnet_cli.compiled import DecodeStep, compiler_problem, deterministic_kernels, use_bitnet_cache
from bitnet_cli.config import ModelConfig
from bitnet_cli.presets import PRESETS
from bitnet_cli.int8 import HalfHead, Int8Linear, to_int8
from bitnet_cli.model import BitNetForCausalLM, generate
from bitnet_cli.optim import build_optimizer

# (experiment, size, batch, seq) of the training step: the preset's own batch where a step
# takes under a second on two cores, a stated smaller one above that.
TRAIN_SHAPES = [("arithmetic", "tiny", 64, 64), ("arithmetic", "5M", 64, 64),
                ("tinystories", "12M", 4, 256), ("baseline", "95M", 2, 256)]
DECODE_SHAPES = [("arithmetic", "5M"), ("tinystories", "12M"), ("baseline", "95M")]
LLAMA_CPP_SHAPE = ("baseline", "95M")  # rows of 768 and 3072: every projection TQ2_0
LLAMA_CPP_CONTEXT = 256
CUDA_TRAIN_SHAPE = ("baseline", "95M", 16, 256)  # the preset's micro-batch
STEP_REPEATS = 4
PROMPT_TOKENS, NEW_TOKENS = 16, 48


def build(experiment: str, size: str, context: int, quant: str = "ternary") -> BitNetForCausalLM:
    shape = PRESETS[experiment]["sizes"][size]["model"]
    config = ModelConfig(vocab_size=PRESETS[experiment]["vocab_size"],
                         max_position_embeddings=context, quant=quant, **shape)
    torch.manual_seed(0)
    return BitNetForCausalLM(config)


def best_of(runs: dict, repeats: int) -> dict:
    """Best wall time of each named function over `repeats` interleaved rounds, after a
    warm-up call of each."""
    for fn in runs.values():
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def machine() -> dict:
    """Memory bandwidth as this process sees it: summing (reading) and copying 256 MiB."""
    x = torch.ones(64 * 2**20)
    y = torch.empty_like(x)
    t = best_of({"read": x.sum, "copy": lambda: y.copy_(x)}, 4)
    return {"threads": torch.get_num_threads(), "torch": torch.__version__,
            "read_gb_s": x.nbytes / t["read"] / 1e9, "copy_gb_s": 2 * x.nbytes / t["copy"] / 1e9}


def train_step(experiment: str, size: str, batch_size: int, seq_len: int,
               device: str = "cpu") -> dict:
    """Best step time of BitNet and of its twin, each eager and compiled. Each case is timed
    while its model is the only one in the process (built, warmed up, timed, freed): two live
    models make each other's steps slower through the memory allocator, unevenly. On CUDA the
    steps run in bf16 autocast, as training does there."""
    ids = torch.randint(0, PRESETS[experiment]["vocab_size"], (batch_size, seq_len + 1),
                        generator=torch.Generator().manual_seed(0)).to(device)
    problem = compiler_problem(torch.device(device))
    use_bitnet_cache()
    best, compile_s = {}, {}
    for compiled in (False,) if problem else (False, True):
        for quant in ("none", "ternary"):
            times = _step_times(build(experiment, size, seq_len, quant), compiled, ids, device)
            best[quant, compiled] = min(times[1:])
            if compiled:
                compile_s[quant] = times[0]
            gc.collect()
    tokens = batch_size * seq_len
    result = {"shape": f"{experiment} {size}", "batch": f"{batch_size} x {seq_len}",
              "tokens": tokens, "bitnet_s": best["ternary", False], "twin_s": best["none", False],
              "ratio": best["ternary", False] / best["none", False]}
    if problem:
        return {**result, "compiled": None, "compile_problem": problem}
    result["compiled"] = {
        "bitnet_s": best["ternary", True], "twin_s": best["none", True],
        "ratio": best["ternary", True] / best["none", True],
        "vs_eager": best["ternary", True] / best["ternary", False],
        "first_step_s": compile_s["ternary"],
        "tok_per_s": tokens / best["ternary", True],
        "twin_tok_per_s": tokens / best["none", True]}
    if device == "cuda":
        result["compiled"].update(_mfu(experiment, size, seq_len, result["compiled"]))
    return result


def _step_times(model, compiled: bool, ids: torch.Tensor, device: str) -> list[float]:
    """Wall times of STEP_REPEATS + 1 training steps, the first a warm-up (and the compile),
    as the training loop takes them: weights quantized once per step, deterministic kernels
    around a compiled step, bf16 autocast on CUDA."""
    model = model.to(device).train()
    optimizer = build_optimizer(model, 1e-3, 0.1, device)
    forward = torch.compile(model) if compiled else model
    times = []
    for _ in range(STEP_REPEATS + 1):
        start = time.perf_counter()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
        kernels = deterministic_kernels() if compiled else contextlib.nullcontext()
        with quantized_for_step(model), autocast, kernels:
            logits = forward(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _mfu(experiment: str, size: str, seq_len: int, compiled: dict) -> dict:
    """Model FLOPs utilization of the compiled steps: FLOPs per token as `bitnet cost` counts
    them, over the bf16 peak of this GPU in cost's table (None for a GPU not in it)."""
    from bitnet_cli.cost import gpu_named, shape_of, training_flops_per_token
    name = torch.cuda.get_device_name()
    gpu = gpu_named(name)
    with torch.device("meta"):
        config = build(experiment, size, seq_len).config
    per_token = training_flops_per_token(shape_of(config, "bench"), seq_len)
    peak = gpu.peak_tflops * 1e12 if gpu else None
    return {"gpu": name, "gpu_in_table": gpu.name if gpu else None,
            "peak_tflops": gpu.peak_tflops if gpu else None, "flops_per_token": per_token,
            "mfu": compiled["tok_per_s"] * per_token / peak if peak else None,
            "twin_mfu": compiled["twin_tok_per_s"] * per_token / peak if peak else None}


def data(repeats: int = 10) -> list[dict]:
    """Milliseconds the CPU takes to make one batch, for every experiment and size at the
    preset's batch shape: work the training loop does between steps. Text experiments cut
    windows from a token array (random tokens here, as the shard cache holds them)."""
    from bitnet_cli.config import build_configs
    from bitnet_cli.experiments import load_experiment
    from bitnet_cli.experiments.text import WindowStream
    rows = []
    for experiment, preset in PRESETS.items():
        task = load_experiment(experiment)
        for size in preset["sizes"]:
            _, cfg = build_configs(experiment, size)
            if hasattr(task, "prepare"):
                tokens = np.random.default_rng(0).integers(0, preset["vocab_size"], 2_000_000,
                                                           dtype=np.uint16)
                stream = WindowStream(tokens, cfg.seed, cfg.batch_size, cfg.seq_len)
            else:
                stream = task.stream(cfg.seed, cfg.batch_size, cfg.seq_len)
            t = best_of({"batch": stream.next_batch}, repeats)
            rows.append({"shape": f"{experiment} {size}",
                         "batch": f"{cfg.batch_size} x {cfg.seq_len}", "ms": 1e3 * t["batch"]})
    return rows


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: every projection, the head, one embedding row
    (norms are too small to count)."""
    config = model.config
    linear = sum(m.codes.numel() if isinstance(m, Int8Linear) else 4 * m.weight.numel()
                 for m in model.modules() if isinstance(m, (BitLinear, Int8Linear)))
    head = model.lm_head
    if isinstance(head, Int8Linear):  # counted above, with the projections
        head_bytes = 0
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


# The engines decode() times: (name, int8 head?, compiled step?); the float engine's two
# precisions are added to these.
INT8_ENGINES = [("int8", "float16", False), ("int8, int8 head", "int8", False),
                ("int8 compiled", "float16", True), ("int8 compiled, int8 head", "int8", True)]


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
    for name, head, compiled in INT8_ENGINES:
        fast = build(experiment, size, PROMPT_TOKENS + NEW_TOKENS).eval()
        to_int8(fast, head)
        step = DecodeStep(fast, compiled, notes.append)
        step.warm_up()
        if step.forward is fast and compiled:
            continue  # no compiler here: said in notes
        engines[name] = (fast, contextlib.nullcontext, step)
    rates = {name: 0.0 for name in engines}
    for name, (m, context, step) in engines.items():
        decode_rate(m, prompt, context, step)  # warm-up: kernels chosen, float weights quantized once
    for _ in range(2):
        for name, (m, context, step) in engines.items():
            rates[name] = max(rates[name], decode_rate(m, prompt, context, step))
    result = {"shape": f"{experiment} {size}", "params": model.num_params(),
              "threads": torch.get_num_threads(), "notes": notes,
              "int8_vs_float32": rates["int8"] / rates["float32"],
              "bf16_vs_float32": rates["bf16 autocast"] / rates["float32"], "engines": {}}
    for name, (m, _, _) in engines.items():
        read = weight_bytes(m)
        result["engines"][name] = {"tok_per_s": rates[name], "vs_float32": rates[name] / rates["float32"],
                                   "weight_bytes_per_token": read, "gb_s": read * rates[name] / 1e9}
    # bf16 autocast reads the fp32 weights, then writes and reads a bf16 copy of each: its
    # bytes per token are not the weights' size, so no GB/s is claimed for it.
    result["engines"]["bf16 autocast"]["gb_s"] = None
    result["layers"] = layers(model, engines["int8"][0])
    if with_llama_cpp:
        result["llama_cpp"] = llama_cpp_decode(model, prompt)
        if "tok_per_s" in result["llama_cpp"]:
            for name in engines:
                result["engines"][name]["vs_llama_cpp"] = rates[name] / result["llama_cpp"]["tok_per_s"]
    return result


def llama_cpp_decode(model: BitNetForCausalLM, prompt: list[int]) -> dict:
    """llama.cpp's greedy decoding speed on `model`'s weights, through llama-cpp-python: the
    model exported as bitnet's GGUF (TQ2_0 codes where rows are multiples of 256, F16
    embedding), the same prompt, new tokens and thread count as bitnet's engines, timed the
    same way (after the prompt, best of three). llama.cpp computes silu(gate) * up for this
    architecture: the same work as relu2, so the speed compares even though the FFN differs."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"missing": "not installed (pip install llama-cpp-python)"}
    import tempfile
    from pathlib import Path

    from bitnet_cli.experiments import load_experiment
    from bitnet_cli.export import GGUF_FILE, write_gguf
    from bitnet_cli.inference import LoadedModel

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
        write_gguf(LoadedModel(model, tokenizer, config, "arithmetic", folder, 0), folder)
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
def layers(model: BitNetForCausalLM, fast: BitNetForCausalLM, repeats: int = 20) -> dict:
    """One token through every BitLinear in model order, float (quantized fp32 weights, as the
    float engine keeps them) against int8: the matmuls with their quantization and rescale."""
    slow = [m for m in model.modules() if isinstance(m, BitLinear)]
    quick = [m for m in fast.modules() if isinstance(m, Int8Linear)]  # q, k, v stacked; gate, up

    def run(modules):
        inputs = [torch.randn(1, 1, m.in_features) for m in modules]
        return lambda: [[m(x) for m, x in zip(modules, inputs)] for _ in range(repeats)]
    t = best_of({"float": run(slow), "int8": run(quick)}, 3)
    read = {"float": 4 * sum(m.weight.numel() for m in slow),
            "int8": sum(m.codes.numel() for m in quick)}
    return {"count": len(slow), "ratio": t["float"] / t["int8"],
            **{f"{k}_ms": 1e3 * t[k] / repeats for k in t},
            **{f"{k}_gb_s": read[k] * repeats / t[k] / 1e9 for k in t}}


def checkpoint_size(experiment: str, size: str) -> dict:
    from bitnet_cli.export import linear_weight_bytes
    with torch.device("meta"):
        model = build(experiment, size, 8)
    latent, packed = linear_weight_bytes(model)
    rest = 4 * (model.num_params() - sum(m.weight.numel() for m in model.modules()
                                         if isinstance(m, BitLinear)))
    return {"shape": f"{experiment} {size}", "latent_bytes": latent, "packed_bytes": packed,
            "ratio": latent / packed, "other_bytes": rest,
            "file_ratio": (latent + rest) / (packed + rest)}


# Run in a fresh interpreter per case, so one case's freed memory cannot hide in another's peak.
_CHILD = """
import resource, sys
import torch, torch.nn.functional as F
from bitnet_cli.bench import build, NEW_TOKENS, PROMPT_TOKENS
from bitnet_cli.int8 import to_int8
from bitnet_cli.model import generate
from bitnet_cli.optim import build_optimizer
kind, what = sys.argv[1:3]
if kind == "decode":
    model = build("baseline", "95M", PROMPT_TOKENS + NEW_TOKENS).eval()
    if what == "int8":
        to_int8(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=what == "bf16 autocast"):
        for _ in generate(model, list(range(PROMPT_TOKENS)), 8):
            pass
elif kind == "train":
    model = build("baseline", "95M", 256, what)
    optimizer = build_optimizer(model, 1e-3, 0.1, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 257))
    for _ in range(2):
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
try:  # VmHWM is this program's own peak (ru_maxrss can carry the parent's over from fork)
    status = open("/proc/self/status").read()
    print(*(int(status.split(f"{key}:")[1].split()[0]) * 1024 for key in ("VmHWM", "VmRSS")))
except (OSError, IndexError):
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024), 0)
"""


def rss(kind: str, what: str) -> dict:
    """Peak and final RSS (bytes) of a fresh process running one case (0 where unknown)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, kind, what], capture_output=True,
                         text=True, check=True)
    peak, final = map(int, out.stdout.split())
    return {"kind": kind, "what": what, "peak_rss_bytes": peak, "final_rss_bytes": final}


def memory() -> list[dict]:
    """Fresh processes on the 95M shape; `idle` has imported torch and bitnet only, the floor
    under every other row. Loading for int8 builds the float model first, which sets its peak;
    what it keeps after conversion is its final RSS."""
    cases = [("idle", "-"), ("decode", "float32"), ("decode", "bf16 autocast"), ("decode", "int8"),
             ("train", "ternary"), ("train", "none")]
    return [rss(kind, what) for kind, what in cases]


def kv_cache(experiment: str = "tinystories", size: str = "12M", new_tokens: int = 128) -> dict:
    """Tokens/s of greedy decoding (int8 engine) with and without the KV cache: without it,
    every token re-runs the whole sequence so far."""
    model = build(experiment, size, PROMPT_TOKENS + new_tokens).eval()
    to_int8(model)
    prompt = list(range(PROMPT_TOKENS))
    t = best_of({"cache": lambda: list(generate(model, prompt, new_tokens)),
                 "none": lambda: list(generate(model, prompt, new_tokens, use_cache=False))}, 1)
    return {"shape": f"{experiment} {size}", "new_tokens": new_tokens,
            "ratio": t["none"] / t["cache"], "cache_tok_per_s": new_tokens / t["cache"],
            "no_cache_tok_per_s": new_tokens / t["none"]}


def run_all(progress=lambda what: None, device: str = "cpu") -> dict:
    """Every section on the CPU; on CUDA, the machine and the 95M training step (decoding on a
    GPU is the int8 engine's next step, not measured here yet)."""
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
    for name, fn in steps:
        progress(name)
        results[name] = fn()
        gc.collect()
    return results
