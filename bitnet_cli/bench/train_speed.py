"""Bench sections about training: the step against the twin, eager and compiled (MFU on
CUDA), the CPU's time to make a batch, and the memory of a fresh process."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bitnet_cli.bench.shapes import best_of, build
from bitnet_cli.nn.bitlinear import quantized_for_step
from bitnet_cli.nn.compiled import TrainingForward, compiler_problem, use_bitnet_cache
from bitnet_cli.nn.devices import autocast_for
from bitnet_cli.training.loop import micro_step
from bitnet_cli.training.optim import build_optimizer
from bitnet_cli.config.presets import PRESETS

# (experiment, size, batch, seq) of the training step: the preset's own batch where a step
# takes under a second on two cores, a stated smaller one above that.
TRAIN_SHAPES = [("arithmetic", "tiny", 64, 64), ("arithmetic", "5M", 64, 64),
                ("tinystories", "12M", 4, 256), ("baseline", "95M", 2, 256)]
CUDA_TRAIN_SHAPE = ("baseline", "95M", 16, 256)  # the preset's micro-batch
STEP_REPEATS = 4


def train_step(experiment: str, size: str, batch_size: int, seq_len: int,
               device: str = "cpu") -> dict:
    """Best step time of BitNet and of its twin, each eager and compiled. Each case is timed
    while its model is the only one in the process (built, warmed up, timed, freed): two live
    models make each other's steps slower through the memory allocator, unevenly. On CUDA the
    steps run in bf16 autocast, as training does there."""
    ids = torch.randint(0, PRESETS[experiment].vocab_size, (batch_size, seq_len + 1),
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
    forward = TrainingForward(model, compiled, lambda line: print(f"note: {line}", file=sys.stderr))
    autocast = autocast_for(torch.device(device))
    times = []
    for _ in range(STEP_REPEATS + 1):
        start = time.perf_counter()
        with quantized_for_step(model):
            forward.run(micro_step, ids[:, :-1], ids[:, 1:], ids[:, 1:].numel(), autocast, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _mfu(experiment: str, size: str, seq_len: int, compiled: dict) -> dict:
    """Model FLOPs utilization of the compiled steps: FLOPs per token as `bitnet cost` counts
    them, over the bf16 peak of this GPU in cost's table (None for a GPU not in it)."""
    from bitnet_cli.report.cost import shape_of, training_flops_per_token
    from bitnet_cli.report.gpus import gpu_named
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
    from bitnet_cli.config.building import build_configs
    from bitnet_cli.tasks import load_experiment
    from bitnet_cli.tasks.text import WindowStream
    rows = []
    for experiment, preset in PRESETS.items():
        task = load_experiment(experiment)
        for size in preset.sizes:
            _, cfg = build_configs(experiment, size)
            if hasattr(task, "prepare"):
                tokens = np.random.default_rng(0).integers(0, preset.vocab_size, 2_000_000,
                                                           dtype=np.uint16)
                stream = WindowStream(tokens, cfg.seed, cfg.batch_size, cfg.seq_len)
            else:
                stream = task.stream(cfg.seed, cfg.batch_size, cfg.seq_len)
            t = best_of({"batch": stream.next_batch}, repeats)
            rows.append({"shape": f"{experiment} {size}",
                         "batch": f"{cfg.batch_size} x {cfg.seq_len}", "ms": 1e3 * t["batch"]})
    return rows


# Run in a fresh interpreter per case, so one case's freed memory cannot hide in another's peak.
_CHILD = """
import resource, sys
from contextlib import nullcontext
import torch
from bitnet_cli.bench.shapes import build, NEW_TOKENS, PROMPT_TOKENS
from bitnet_cli.nn.bitlinear import quantized_for_step
kind, what = sys.argv[1:3]
if kind == "decode":  # as `bitnet chat` does: the model loaded from a checkpoint by its engine
    from bitnet_cli.nn.model import generate
    from bitnet_cli.use.loading import load_model
    engine = {"float32": "float", "bf16 autocast": "float"}.get(what, what)
    loaded = load_model(sys.argv[3], engine=engine)
    if loaded.engine != engine:
        raise SystemExit(f"no {engine} engine here: {loaded.engine_note}")
    model = loaded.model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=what == "bf16 autocast"):
        for _ in generate(model, list(range(PROMPT_TOKENS)), 8):
            pass
elif kind == "train":
    from bitnet_cli.training.loop import micro_step
    from bitnet_cli.training.optim import build_optimizer
    model = build("baseline", "95M", 256, what)
    optimizer = build_optimizer(model, 1e-3, 0.1, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 257))
    for _ in range(2):
        with quantized_for_step(model):
            micro_step(model, ids[:, :-1], ids[:, 1:], ids[:, 1:].numel(), nullcontext, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
try:  # VmHWM is this program's own peak (ru_maxrss can carry the parent's over from fork)
    status = open("/proc/self/status").read()
    print(*(int(status.split(f"{key}:")[1].split()[0]) * 1024 for key in ("VmHWM", "VmRSS")))
except (OSError, IndexError):
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024), 0)
"""


def rss(kind: str, what: str, checkpoint: str = "-", runs: int = 1) -> dict:
    """Peak and final RSS (bytes) of a fresh process running one case (0 where unknown); with
    several runs, the one of the lowest peak (as the speed rows take the best of a few: the
    same process's peak varies by a third from run to run on a busy machine)."""
    measured = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _CHILD, kind, what, checkpoint],
                             capture_output=True, text=True, check=True)
        measured.append(tuple(map(int, out.stdout.split())))
    peak, final = min(measured)
    return {"kind": kind, "what": what, "peak_rss_bytes": peak, "final_rss_bytes": final}


def memory() -> list[dict]:
    """Fresh processes on the 95M shape; `idle` has imported torch and bitnet only, the floor
    under every other row. A decoding process loads a 95M checkpoint (random weights) as chat
    does, with each engine."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = str(write_checkpoint(Path(folder), build("baseline", "95M", 256)))
        cases = [("idle", "-"), ("decode", "float32"), ("decode", "bf16 autocast"),
                 ("decode", "int8"), ("decode", "2bit"), ("train", "ternary"), ("train", "none")]
        return [rss(kind, what, checkpoint, runs=2) for kind, what in cases]


def write_checkpoint(folder: Path, model) -> Path:
    """`model` saved as a checkpoint of a run in `folder` (any tokenizer: the prompt goes in
    as ids), as training writes one."""
    from bitnet_cli.config.reading import to_dict
    from bitnet_cli.store.checkpoint import save_checkpoint
    from bitnet_cli.tasks import load_experiment
    load_experiment("arithmetic").tokenizer().save(str(folder / "tokenizer.json"))
    trainer = {"step": 1, "experiment": "baseline", "model": to_dict(model.config)}
    return save_checkpoint(folder / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()),
                           trainer, keep=1, tokenizer=folder / "tokenizer.json")
