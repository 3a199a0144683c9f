"""How a run proceeds: set up, step, log, evaluate, checkpoint. Knows no Rich and no argv.

The loop talks to the screen through a Reporter (see NullReporter for the protocol), so the same
code drives the live terminal view, the tests, and anything else that wants to watch.
"""

from __future__ import annotations

import contextlib
import math
import platform
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from bitnet_cli import __version__, dist
from bitnet_cli.checkpoint import (load_model_tensors, load_optimizer_tensors, newest_loadable,
                                   rng_state, save_checkpoint, set_rng_state)
from bitnet_cli.config import (PRESETS, build_configs, check_experiment, format_count,
                               model_config_from_dict, to_dict, train_config_from_dict)
from bitnet_cli.errors import BitnetError
from bitnet_cli.experiments import load_experiment
from bitnet_cli.experiments.problems import IGNORE
from bitnet_cli.metrics import MetricsWriter, truncate_metrics
from bitnet_cli.model import BitNetForCausalLM
from bitnet_cli.optim import apply_schedule, build_optimizer
from bitnet_cli.runs import (CONFIG_FILE, METRICS_FILE, STATE_FILE, TOKENIZER_FILE, StateFile,
                             create_run_dir, now_iso, pid_alive, read_json, run_status,
                             write_json_atomic)


class NullReporter:
    """The reporter protocol; every hook is optional to implement."""

    def preparing(self, what: str, done: int, total: int | None) -> None: ...
    def start(self, info: dict) -> None: ...
    def log(self, row: dict) -> None: ...
    def eval(self, row: dict) -> None: ...
    def checkpoint(self, step: int, path: Path) -> None: ...
    def finish(self, info: dict) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU was found"
        raise BitnetError(f"--device cuda is not available here ({why}); use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BitnetError("--device mps is not available here (no Apple GPU); use --device cpu or auto")
    return torch.device(name)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full float32 elsewhere (CPU bf16 is slow, MPS bf16 is patchy)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def prepare_task(task, cfg, progress=None) -> None:
    """Text experiments find or build their token shards and tokenizer; the synthetic ones
    make their data as they go and need nothing."""
    if hasattr(task, "prepare"):
        vocab = cfg.vocab_size or PRESETS[cfg.experiment]["vocab_size"]
        task.prepare(cfg.data, vocab, cfg.steps * cfg.tokens_per_step, progress)
    elif cfg.data is not None:
        raise BitnetError(f"the {cfg.experiment!r} experiment makes its own data and takes no --data")
    elif cfg.vocab_size is not None:
        raise BitnetError(f"the {cfg.experiment!r} experiment has a fixed vocabulary; "
                          "--vocab-size is for the text experiments")


def create_run(experiment: str, size: str | None = None, argv: list[str] | None = None,
               quant: str | None = None, progress=None, share: dist.Share = dist.Share(),
               **overrides) -> Path:
    """Validate the configuration and the data, then make the run folder with config.json,
    tokenizer.json and state.json. Nothing is written when either is bad. `share` says how many
    processes will train it (in all, and on this machine)."""
    check_experiment(experiment)
    task = load_experiment(experiment)
    model_cfg, train_cfg = build_configs(experiment, size, quant=quant, **overrides)
    # fail before creating anything
    dist.check_world(share, train_cfg.batch_size, resolve_device(train_cfg.device))
    prepare_task(task, train_cfg, progress)
    model_cfg.vocab_size = task.tokenizer().get_vocab_size()
    run_dir = create_run_dir(experiment, train_cfg.size, train_cfg.name)
    config = {
        "run_id": run_dir.name,
        "experiment": experiment,
        "size": train_cfg.size,
        "num_params": model_cfg.num_params(),
        "headline": task.headline,
        "model": to_dict(model_cfg),
        "train": to_dict(train_cfg),
        "versions": {"bitnet": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "argv": argv or [],
        "created_at": now_iso(),
    }
    write_json_atomic(run_dir / CONFIG_FILE, config)
    task.tokenizer().save(str(run_dir / TOKENIZER_FILE))
    StateFile(run_dir).update(status="created", step=0, total_steps=train_cfg.steps)
    return run_dir


def run_training(run_dir: Path, reporter=None) -> dict:
    """Train the run in `run_dir` from its newest good checkpoint (or from scratch) to its last
    step. SIGINT or SIGTERM stops it after the current step with a checkpoint; the returned
    status is then "interrupted" (a second signal stops at once, without one).

    Under torchrun every rank calls this with the same folder; each trains on its share of
    every batch and only rank 0 reports and writes (see dist.py)."""
    share = dist.current()
    reporter = (reporter or NullReporter()) if share.is_main else NullReporter()
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG_FILE)
    model_cfg = model_config_from_dict(config["model"])
    cfg = train_config_from_dict(config["train"])
    task = load_experiment(config["experiment"])
    device = resolve_device(cfg.device)
    dist.check_world(share, cfg.batch_size, device)
    device = dist.start(share, device)
    try:
        info = _train(run_dir, config, model_cfg, cfg, task, share, device, reporter)
        # Rank 0 may still be evaluating or saving the last step: leave together, or the others
        # would tear the process group down under it.
        dist.barrier()
        return info
    finally:
        dist.stop()


def _train(run_dir, config, model_cfg, cfg, task, share, device, reporter) -> dict:
    # One process per machine builds the data cache; the others then find it ready.
    if share.local_rank != 0:
        dist.barrier()
    prepare_task(task, cfg, reporter.preparing)
    if share.local_rank == 0:
        dist.barrier()
    if task.tokenizer().to_str() != Tokenizer.from_file(str(run_dir / TOKENIZER_FILE)).to_str():
        raise BitnetError(f"the data for run {run_dir.name} no longer gives the tokenizer it was "
                          "trained with (its files changed, or the shard cache was rebuilt)")
    autocast = autocast_for(device)

    torch.manual_seed(cfg.seed)
    model = BitNetForCausalLM(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, device.type)
    stream = task.stream(cfg.seed, cfg.batch_size, cfg.seq_len, share.rank, share.world_size)
    step, tokens_seen = 0, 0

    resumed_from, contents, skipped = newest_loadable(run_dir / "checkpoints")
    if resumed_from is not None:
        tensors, optim_tensors, trainer = contents
        load_model_tensors(model, {k: v.to(device) for k, v in tensors.items()})
        load_optimizer_tensors(model, optimizer, optim_tensors)
        stream.load_state_dict(trainer["data"])
        set_rng_state(trainer["rng"])
        step, tokens_seen = trainer["step"], trainer["tokens"]
    if share.is_main:
        # Rows logged after the checkpoint are about to be trained again: drop them so the
        # file holds each step once, as an uninterrupted run's would.
        truncate_metrics(run_dir / METRICS_FILE, step)

    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    trained = dist.wrap(model, share, device)
    forward = torch.compile(trained) if use_compile else trained

    state = StateFile(run_dir) if share.is_main else None
    metrics = MetricsWriter(run_dir / METRICS_FILE) if share.is_main else None
    if share.is_main:
        state.update(status="running", step=step, total_steps=cfg.steps, device=str(device),
                     world_size=share.world_size, local_world_size=share.local_world_size,
                     started_at=state.state.get("started_at") or now_iso(), error=None)
    reporter.start({"run_id": run_dir.name, "run_dir": str(run_dir), "step": step,
                    "total_steps": cfg.steps, "device": str(device), "compile": use_compile,
                    "world_size": share.world_size,
                    "num_params": model.num_params(), "params": format_count(model.num_params()),
                    "resumed_from": str(resumed_from) if resumed_from else None,
                    "skipped_checkpoints": skipped, "headline": task.headline})
    saved_step = step if resumed_from is not None else None

    def save() -> None:
        nonlocal saved_step
        saved_step = step
        if not share.is_main:
            return
        trainer = {"step": step, "tokens": tokens_seen, "data": stream.state_dict(),
                   "rng": rng_state(), "run_id": run_dir.name, "saved_at": now_iso(),
                   "model": config["model"], "experiment": config["experiment"]}
        path = save_checkpoint(run_dir / "checkpoints", step, model, optimizer, trainer,
                               cfg.keep_checkpoints, tokenizer=run_dir / TOKENIZER_FILE)
        reporter.checkpoint(step, path)

    def evaluate() -> dict | None:
        if not share.is_main:  # the others go on to the next step and wait for rank 0 there
            return None
        row = {"step": step, "split": "eval", "tokens": tokens_seen, "time": time.time(),
               **task.evaluate(model, device, autocast)}
        row["ppl"] = math.exp(min(row["loss"], 50.0))
        metrics.write(row)
        reporter.eval(row)
        return row

    status, error, last_eval = "failed", None, None
    with stop_signals() as stop:
        try:
            model.train()
            window_start, window_tokens = time.perf_counter(), 0
            while step < cfg.steps and not dist.any_rank(bool(stop.requested)):
                lr, wd = apply_schedule(optimizer, step, cfg.steps, cfg.lr, cfg.warmup_steps,
                                        cfg.weight_decay)
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    inputs, labels = stream.next_batch()
                    inputs, labels = inputs.to(device), labels.to(device)
                    # The mean over the whole batch's target tokens, on every rank: a rank's
                    # rows may hold more or fewer answer tokens than another's.
                    targets = dist.all_sum((labels != IGNORE).sum()).clamp(min=1)
                    with dist.gradient_sync(trained, micro == cfg.grad_accum - 1):
                        with autocast():
                            logits = forward(inputs)
                        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                               ignore_index=IGNORE, reduction="sum") / targets
                        # DDP averages gradients over ranks; each rank's loss is its share of
                        # the sum, so scale back up by the world size.
                        (loss * (share.world_size / cfg.grad_accum)).backward()
                    loss_sum += loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += cfg.tokens_per_step
                window_tokens += cfg.tokens_per_step

                if step % cfg.log_every == 0 or step == cfg.steps:
                    loss_sum = dist.all_sum(loss_sum)
                    elapsed = time.perf_counter() - window_start
                    if share.is_main:  # tokens are the whole batch's: tok/s is global
                        row = {"step": step, "split": "train",
                               "loss": loss_sum.item() / cfg.grad_accum, "lr": lr, "wd": wd,
                               "grad_norm": grad_norm.item(), "tokens": tokens_seen,
                               "tok_per_s": window_tokens / max(elapsed, 1e-9),
                               "time": time.time()}
                        metrics.write(row)
                        reporter.log(row)
                        state.update(status="running", step=step, total_steps=cfg.steps,
                                     loss=row["loss"], tok_per_s=row["tok_per_s"])
                    window_start, window_tokens = time.perf_counter(), 0
                paused = False
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    last_eval, paused = evaluate(), True
                if step % cfg.save_every == 0 or step == cfg.steps:
                    save()
                    paused = True
                if paused:  # tokens/s measures training alone, not evaluation or saving
                    window_start, window_tokens = time.perf_counter(), 0
            if step < cfg.steps:  # some rank was asked to stop
                if saved_step != step:
                    save()
                status = "interrupted"
            else:
                status = "finished"
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep the last checkpoint
            status = "interrupted"
        except BaseException as e:
            error = dist.peer_failure(e) or f"{type(e).__name__}: {e}"
            if dist.peer_failure(e):
                raise dist.lost_peer_error(f"run {run_dir.name} stopped at step {step}: {error}; "
                                           f"resume it with: bitnet resume {run_dir.name}") from None
            raise
        finally:
            if share.is_main:
                metrics.close()
                state.update(status=status, step=step, total_steps=cfg.steps, error=error,
                             checkpoint_step=saved_step)
    info = {"run_id": run_dir.name, "run_dir": str(run_dir), "status": status, "step": step,
            "checkpoint_step": saved_step, "last_eval": last_eval, "headline": task.headline}
    reporter.finish(info)
    return info


class stop_signals:
    """While active, the first SIGINT or SIGTERM only sets `requested`, so the loop can finish
    its step and save; a second SIGINT raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.requested = None
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def prepare_resume(run_dir: Path, steps: int | None = None,
                   share: dist.Share = dist.Share()) -> None:
    """Check that a run can be resumed on the processes `share` describes, and extend it to
    `steps`; nothing on disk changes unless every check passes. A run created but never
    started (the launcher of a multi-process run starts its workers this way) starts at step 0."""
    config = read_json(run_dir / CONFIG_FILE)
    dist.check_world(share, config["train"]["batch_size"], resolve_device(config["train"]["device"]))
    state_path = run_dir / STATE_FILE
    state = read_json(state_path) if state_path.exists() else {}
    status = run_status(state)
    run_id = run_dir.name
    if status == "running":
        where = f" on {state.get('host')}" if pid_alive(state.get("pid"), state.get("host")) is None else ""
        raise BitnetError(f"run {run_id} is still running (pid {state.get('pid')}{where}); "
                          "stop it first, or watch it with `bitnet status --watch`")
    path, contents, _ = newest_loadable(run_dir / "checkpoints")
    if path is None and status == "created":
        contents = (None, None, {"step": 0})
    elif path is None:
        raise BitnetError(f"run {run_id} has no checkpoint to resume from; start a new run with: "
                          + " ".join(config.get("argv") or ["bitnet", "train", config["experiment"]]))
    done = contents[2]["step"]
    total = config["train"]["steps"]
    if steps is not None:
        if steps < 1:
            raise BitnetError(f"--steps must be a positive whole number, got {steps}")
        if steps <= done:
            raise BitnetError(f"--steps {steps} is not more than the {done} steps run {run_id} "
                              "has already done")
        if steps != total:
            config["train"]["steps"] = steps
            write_json_atomic(run_dir / CONFIG_FILE, config)
    elif done >= total:
        raise BitnetError(f"run {run_id} already finished all {total} steps; pass --steps N "
                          f"(more than {total}) to train it further")


def record_worker_failure(run_dir: Path, failure: str) -> str:
    """After a worker of a multi-process run failed: mark the run failed if rank 0 died before
    it could, and say where the run stands."""
    state = StateFile(run_dir)
    if run_status(state.state) in ("crashed", "created", "running"):
        state.update(status="failed", error=failure)
    path, contents, _ = newest_loadable(run_dir / "checkpoints")
    kept = f"last checkpoint at step {contents[2]['step']}" if path else "no checkpoint yet"
    step = state.state.get("step", 0)
    return (f"{failure}, so run {run_dir.name} stopped at step {step} ({kept}); continue it "
            f"with: bitnet resume {run_dir.name}")


def last_world_size(run_dir: Path) -> int:
    """How many processes to resume a run on by default: as many as it last used, when they
    were all on one machine (a multi-node run is resumed with torchrun on each node)."""
    state_path = run_dir / STATE_FILE
    state = read_json(state_path) if state_path.exists() else {}
    world = state.get("world_size", 1)
    return world if world == state.get("local_world_size", world) else 1
