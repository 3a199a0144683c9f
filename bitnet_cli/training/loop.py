"""How a run proceeds: step, log, evaluate, checkpoint, stop. Knows no Rich and no argv.
(What comes before the loop, a run's folder, config and data, is run_setup.py's.)

The loop talks to the screen through a Reporter (see NullReporter for the protocol), so the same
code drives the live terminal view, the tests, and anything else that wants to watch.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitnet_cli.training import dist
from bitnet_cli.nn.bitlinear import quantized_for_step
from bitnet_cli.store.checkpoint import (load_model_tensors, load_optimizer_tensors, newest_loadable,
                                   remove_partial_saves, rng_state, save_checkpoint,
                                   set_rng_state)
from bitnet_cli.nn.compiled import training_forward, wants_compile
from bitnet_cli.config.settings import format_count
from bitnet_cli.errors import BitnetError
from bitnet_cli.tasks import load_experiment
from bitnet_cli.tasks.problems import IGNORE
from bitnet_cli.tasks.rows import DeviceBatches
from bitnet_cli.store.files import remove_leftovers
from bitnet_cli.training.health import TernaryHealth
from bitnet_cli.store.metrics import MetricsLog, MetricsWriter, TensorBoardWriter, truncate_metrics
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.training.optim import apply_schedule, build_optimizer
from bitnet_cli.nn.devices import autocast_for, resolve_device
from bitnet_cli.training.setup import check_memory, prepare_task, read_run_config, run_tokenizer
from bitnet_cli.store.runs import METRICS_FILE, TOKENIZER_FILE, StateFile, now_iso, run_lock

MAX_NONFINITE_STEPS = 20  # skipped steps in a row before a run is called diverged
MAX_RUN_TIME_S = 10 * 365 * 86400


class NullReporter:
    """The reporter protocol; every hook is optional to implement."""

    def preparing(self, what: str, done: int, total: int | None) -> None: ...
    def start(self, info: dict) -> None: ...
    def log(self, row: dict) -> None: ...
    def eval(self, row: dict) -> None: ...
    def checkpoint(self, step: int, path: Path) -> None: ...
    def notice(self, text: str) -> None: ...
    def finish(self, info: dict) -> None: ...


def run_training(run_dir: Path, reporter=None) -> dict:
    """Train the run in `run_dir` from its newest good checkpoint (or from scratch) to its last
    step. SIGINT or SIGTERM stops it after the current step with a checkpoint; the returned
    status is then "interrupted" (a second signal stops at once, without one).

    Under torchrun every rank calls this with the same folder; each trains on its share of
    every batch and only rank 0 reports and writes (see dist.py)."""
    share = dist.current()
    reporter = (reporter or NullReporter()) if share.is_main else NullReporter()
    run_dir = Path(run_dir)
    config, model_cfg, cfg = read_run_config(run_dir)
    task = load_experiment(cfg.experiment)
    device = resolve_device(cfg.device)
    dist.check_world(share, cfg.batch_size, device)
    # Before joining the process group, so that no collective waits on it: every process finds
    # or builds the data (one per machine builds it; the others wait on the cache's file lock).
    prepare_task(task, cfg, reporter.preparing)
    with run_lock(run_dir) if share.is_main else contextlib.nullcontext():
        return _train_in_group(run_dir, config, model_cfg, cfg, task, share, device, reporter)


def _train_in_group(run_dir, config, model_cfg, cfg, task, share, device, reporter) -> dict:
    device = dist.start(share, device)
    check_memory(model_cfg, cfg, device, share.world_size)
    try:
        info = _train(run_dir, config, model_cfg, cfg, task, share, device, reporter)
        # Rank 0 may still be evaluating or saving the last step: leave together, or the others
        # would tear the process group down under it.
        dist.barrier()
        return info
    finally:
        dist.stop()


def _train(run_dir, config, model_cfg, cfg, task, share, device, reporter) -> dict:
    if task.tokenizer().to_str() != run_tokenizer(run_dir).to_str():
        raise BitnetError(f"the data for run {run_dir.name} no longer gives the tokenizer it was "
                          "trained with (its files changed, or the shard cache was rebuilt)")
    autocast = autocast_for(device)

    torch.manual_seed(cfg.seed)
    model = BitNetForCausalLM(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, device.type)
    stream = DeviceBatches(task.stream(cfg.seed, cfg.batch_size, cfg.seq_len, share.rank,
                                       share.world_size), device)
    step, tokens_seen = 0, 0

    resumed_from, contents, skipped = newest_loadable(run_dir / "checkpoints")
    nonfinite = {"total": 0, "in_a_row": 0}  # steps skipped for a non-finite gradient
    if resumed_from is not None:
        step, tokens_seen = _restore(resumed_from, contents, model, optimizer, stream, device)
        nonfinite.update(contents[2].get("nonfinite") or {})
    if share.is_main:  # under the run's lock: whatever temporary files are here are a crash's
        remove_leftovers(run_dir, ".*.tmp")
        remove_partial_saves(run_dir / "checkpoints")
        # Rows logged after the checkpoint are about to be trained again: drop them so the
        # file holds each step once, as an uninterrupted run's would.
        truncate_metrics(run_dir / METRICS_FILE, step)

    # The codes now are what the first evaluation's flips are counted against.
    health = TernaryHealth(model, step) if share.is_main else None
    trained = dist.wrap(model, share, device)
    forward = training_forward(trained, wants_compile(cfg, device), device, reporter.notice)

    state = StateFile(run_dir) if share.is_main else None
    metrics = None
    if share.is_main:
        metrics = MetricsLog(MetricsWriter(run_dir / METRICS_FILE),
                             *([TensorBoardWriter(run_dir, step)] if cfg.tensorboard else []))
    if share.is_main:
        state.update(status="running", step=step, total_steps=cfg.steps, device=str(device),
                     world_size=share.world_size, local_world_size=share.local_world_size,
                     started_at=state.state.get("started_at") or now_iso(), error=None)
    clock = TrainingClock(state.state.get("elapsed_s") if share.is_main else None, tokens_seen)
    reporter.start({"run_id": run_dir.name, "run_dir": str(run_dir), "step": step,
                    "total_steps": cfg.steps, "device": str(device), "compile": forward.compiled,
                    "experiment": cfg.experiment, "size": config.get("size"),
                    "world_size": share.world_size,
                    "num_params": model.num_params(), "params": format_count(model.num_params()),
                    "resumed_from": str(resumed_from) if resumed_from else None,
                    "skipped_checkpoints": skipped, "headline": task.headline})
    saved_step = step if resumed_from is not None else None

    def save() -> None:
        nonlocal saved_step
        if share.is_main:
            if not bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all()):
                raise BitnetError(f"run {run_dir.name} diverged: its weights are not finite at "
                                  f"step {step}, so they were not saved; {_lower_lr(cfg)}")
            trainer = {"step": step, "tokens": tokens_seen, "data": stream.state_dict(),
                       "rng": rng_state(), "nonfinite": dict(nonfinite), "run_id": run_dir.name,
                       "saved_at": now_iso(), "model": config["model"],
                       "experiment": config["experiment"]}
            path = save_checkpoint(run_dir / "checkpoints", step, model, optimizer, trainer,
                                   cfg.keep_checkpoints, tokenizer=run_dir / TOKENIZER_FILE)
            reporter.checkpoint(step, path)
        saved_step = step  # only once the checkpoint is on disk

    def evaluate() -> dict | None:
        if not share.is_main:  # the others go on to the next step and wait for rank 0 there
            return None
        started = time.perf_counter()
        with health.watching_inputs():
            measured = task.evaluate(model, device, autocast)
        row = {"step": step, "split": "eval", "tokens": tokens_seen, "time": time.time(),
               **measured, "eval_s": time.perf_counter() - started}
        row["ppl"] = math.exp(min(row["loss"], 50.0))
        metrics.write(row)
        if health.active:
            metrics.write({**health.measure(step), "tokens": tokens_seen, "time": row["time"]})
        reporter.eval(row)
        return row

    def micro_step(model_call, inputs, labels, targets) -> torch.Tensor:
        with autocast():
            logits = model_call(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                               reduction="sum") / targets
        # DDP averages gradients over ranks; each rank's loss is its share of the sum, so
        # scale back up by the world size.
        (loss * (share.world_size / cfg.grad_accum)).backward()
        return loss.detach()

    status, error, last_eval = "failed", None, None
    with stop_signals() as stop:
        try:
            model.train()
            window_start, window_tokens = time.perf_counter(), 0
            while step < cfg.steps and not dist.any_rank(bool(stop.requested)):
                lr, wd = apply_schedule(optimizer, step, cfg.steps, cfg.lr, cfg.warmup_steps,
                                        cfg.weight_decay, cfg.extended_at)
                loss_sum = torch.zeros((), device=device)
                with quantized_for_step(model):
                    for micro in range(cfg.grad_accum):
                        inputs, labels = stream.next_batch()
                        # The mean over the whole batch's target tokens, on every rank: a
                        # rank's rows may hold more or fewer answer tokens than another's.
                        targets = dist.all_sum((labels != IGNORE).sum()).clamp(min=1)
                        with dist.gradient_sync(trained, micro == cfg.grad_accum - 1):
                            loss_sum += forward.run(micro_step, inputs, labels, targets)
                        stream.prefetch()  # while a GPU still works on this micro-step
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                # A non-finite loss makes a non-finite gradient. The norm is of the all-reduced
                # gradient, so every rank skips the same steps.
                if bool(grad_norm.isfinite()):
                    optimizer.step()
                    nonfinite["in_a_row"] = 0
                else:
                    nonfinite["total"] += 1
                    nonfinite["in_a_row"] += 1
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += cfg.tokens_per_step
                window_tokens += cfg.tokens_per_step
                if nonfinite["in_a_row"] >= MAX_NONFINITE_STEPS:
                    raise BitnetError(
                        f"run {run_dir.name} diverged: the loss or gradient was not finite for "
                        f"{MAX_NONFINITE_STEPS} steps in a row (steps "
                        f"{step - MAX_NONFINITE_STEPS + 1}-{step}); {_lower_lr(cfg)}")

                if step % cfg.log_every == 0 or step == cfg.steps:
                    loss_sum = dist.all_sum(loss_sum)
                    elapsed = time.perf_counter() - window_start
                    if share.is_main:  # tokens are the whole batch's: tok/s is global
                        row = {"step": step, "split": "train",
                               "loss": loss_sum.item() / cfg.grad_accum, "lr": lr, "wd": wd,
                               "grad_norm": grad_norm.item(), "tokens": tokens_seen,
                               "tok_per_s": window_tokens / max(elapsed, 1e-9),
                               "time": time.time()}
                        if nonfinite["total"]:
                            row["skipped_steps"] = nonfinite["total"]
                        metrics.write(row)
                        reporter.log(row)
                        state.update(status="running", step=step, total_steps=cfg.steps,
                                     loss=row["loss"], tok_per_s=row["tok_per_s"],
                                     **clock.read(tokens_seen))
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
            failure = _as_user_error(e, run_dir, cfg, model, step)
            error = str(failure) if failure else f"{type(e).__name__}: {e}"
            if failure:
                raise failure from None
            raise
        finally:
            if share.is_main:
                with contextlib.suppress(OSError):  # a full disk: nothing more can be recorded
                    metrics.close()
                    state.update(status=status, step=step, total_steps=cfg.steps, error=error,
                                 checkpoint_step=saved_step, **clock.read(tokens_seen))
    info = {"run_id": run_dir.name, "run_dir": str(run_dir), "status": status, "step": step,
            "checkpoint_step": saved_step, "last_eval": last_eval, "headline": task.headline,
            **clock.read(tokens_seen)}
    reporter.finish(info)
    return info


def _restore(path: Path, contents, model, optimizer, stream, device) -> tuple[int, int]:
    """Put a checkpoint's model, optimizer, data cursor and RNG back; (step, tokens) seen."""
    tensors, optim_tensors, trainer = contents
    try:
        load_model_tensors(model, {k: v.to(device) for k, v in tensors.items()})
        load_optimizer_tensors(model, optimizer, optim_tensors)
        stream.load_state_dict(trainer["data"])
        set_rng_state(trainer["rng"])
        return trainer["step"], trainer["tokens"]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise BitnetError(f"checkpoint {path} does not fit this run ({type(e).__name__}: "
                          f"{str(e)[:200]}); move it away to resume from the one before") from None


def _lower_lr(cfg) -> str:
    return f"train again with a lower --lr (this run's is {cfg.lr:g})"


def _as_user_error(e: BaseException, run_dir: Path, cfg, model, step: int) -> BitnetError | None:
    """The one line to stop with for an error the user can act on; None for a bug."""
    if isinstance(e, BitnetError):
        return e
    peer = dist.peer_failure(e)
    if peer:
        return dist.lost_peer_error(f"run {run_dir.name} stopped at step {step}: {peer}; "
                                    f"resume it with: bitnet resume {run_dir.name}")
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
            s in str(e) for s in ("out of memory", "can't allocate memory"))):
        accumulated = f" (x{cfg.grad_accum} accumulated)" if cfg.grad_accum > 1 else ""
        return BitnetError(
            f"out of memory at step {step}: a batch of {cfg.batch_size} x {cfg.seq_len} tokens"
            f"{accumulated} through {format_count(model.num_params())} parameters does not fit; "
            "lower --batch-size (--grad-accum keeps the effective batch) or --seq-len")
    if isinstance(e, OSError):
        return BitnetError(f"run {run_dir.name} stopped at step {step}: cannot write "
                           f"{e.filename or 'to its folder'}: {e.strerror or e}")
    return None


class TrainingClock:
    """Wall time the run has spent training (every session, with its evaluations, checkpoints
    and compiling) and this session's average tokens/s: what `status` and the end of a run
    report, where the last interval's speed would flatter it."""

    def __init__(self, elapsed_before, tokens_now: int):
        ok = isinstance(elapsed_before, (int, float)) and not isinstance(elapsed_before, bool)
        # What state.json says, unless it cannot be a run's time (damaged, or planted)
        self.before = float(elapsed_before) if ok and 0 <= elapsed_before < MAX_RUN_TIME_S else 0.0
        self.started, self.tokens_at_start = time.perf_counter(), tokens_now

    def read(self, tokens_now: int) -> dict:
        spent = time.perf_counter() - self.started
        return {"elapsed_s": round(self.before + spent, 3),
                "avg_tok_per_s": (tokens_now - self.tokens_at_start) / max(spent, 1e-9)}


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


