"""One training session of a run, beside the loop: everything a step does besides the maths.
Saving checkpoints, evaluating, logging metrics, the state.json heartbeat, the count of skipped
non-finite steps, the wall clock and the stop signals live here, so that loop.py reads as the
training itself. Only rank 0 writes; the other ranks' sessions just keep count."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path

import torch

from bitnet_cli.config.numbers import format_count, real
from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.cores import CoreFollower, threads_sleep_waiting
from bitnet_cli.store.checkpoint import rng_state, save_checkpoint
from bitnet_cli.store.metrics import MetricsLog, MetricsWriter, TensorBoardWriter
from bitnet_cli.store.runs import METRICS_FILE, TOKENIZER_FILE, StateFile, now_iso
from bitnet_cli.training import dist
from bitnet_cli.training.health import TernaryHealth

MAX_NONFINITE_STEPS = 20  # skipped steps in a row before a run is called diverged
MAX_RUN_TIME_S = 10 * 365 * 86400


class RunSession:
    """The run's step and tokens, and what happens around each step: `advance` after the
    optimizer, `log`, `evaluate` and `save` at their cadence, `recording` around it all."""

    def __init__(self, run_dir: Path, config: dict, cfg, task, share, device, reporter, model,
                 optimizer, stream, step: int, tokens: int, trainer: dict | None):
        self.run_dir, self.config, self.cfg, self.task = run_dir, config, cfg, task
        self.share, self.device, self.reporter = share, device, reporter
        self.model, self.optimizer, self.stream = model, optimizer, stream
        self.step, self.tokens = step, tokens
        self.saved_step = step if trainer is not None else None
        self.nonfinite = {"total": 0, "in_a_row": 0}  # steps skipped for a non-finite gradient
        self.nonfinite.update((trainer or {}).get("nonfinite") or {})
        self.status, self.last_eval = "failed", None
        # The codes now are what the first evaluation's flips are counted against.
        self.health = TernaryHealth(model, step) if share.is_main else None
        self.state = self.metrics = None
        # A background CPU run (nice 19) keeps to the cores other programs leave free.
        self.cores = CoreFollower() if device.type == "cpu" and not cfg.foreground else None

    def start(self, info: dict) -> None:
        """Open the metrics and the heartbeat, and tell the reporter what is being trained."""
        cfg, share = self.cfg, self.share
        # Before the clock starts: the sample of the cores is no training time.
        cores = self.cores.start() if self.cores else None
        if share.is_main:
            self.state = StateFile(self.run_dir)
            self.metrics = MetricsLog(MetricsWriter(self.run_dir / METRICS_FILE), *(
                [TensorBoardWriter(self.run_dir, self.step)] if cfg.tensorboard else []))
            self.state.update(status="running", step=self.step, total_steps=cfg.steps,
                              device=str(self.device), world_size=share.world_size,
                              local_world_size=share.local_world_size, error=None,
                              started_at=self.state.state.get("started_at") or now_iso())
        self.clock = TrainingClock(self.state.state.get("elapsed_s") if share.is_main else None,
                                   self.tokens)
        self.reporter.start({
            "run_id": self.run_dir.name, "run_dir": str(self.run_dir), "step": self.step,
            "total_steps": cfg.steps, "device": str(self.device), "experiment": cfg.experiment,
            "size": self.config.get("size"), "world_size": share.world_size,
            "num_params": self.model.num_params(), "params": format_count(self.model.num_params()),
            "init_from": cfg.init_from, "teacher": cfg.teacher, "headline": self.task.headline,
            **info})
        self._share_cores(cores)
        self.restart_window()

    def restart_window(self) -> None:
        """tokens/s measures training alone: the window restarts after evaluating or saving."""
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def advance(self, grad_norm: torch.Tensor) -> None:
        """The optimizer step (skipped for a non-finite gradient: the norm is of the all-reduced
        gradient, so every rank skips the same steps), then one step more."""
        if bool(grad_norm.isfinite()):
            self.optimizer.step()
            self.nonfinite["in_a_row"] = 0
        else:
            self.nonfinite["total"] += 1
            self.nonfinite["in_a_row"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.cfg.tokens_per_step
        self.window_tokens += self.cfg.tokens_per_step
        if self.cores:
            self._share_cores(self.cores.follow())
        if self.nonfinite["in_a_row"] >= MAX_NONFINITE_STEPS:
            raise BitnetError(
                f"run {self.run_dir.name} diverged: the loss or gradient was not finite for "
                f"{MAX_NONFINITE_STEPS} steps in a row (steps "
                f"{self.step - MAX_NONFINITE_STEPS + 1}-{self.step}); {lower_lr(self.cfg)}")

    def _share_cores(self, change: tuple[int, int] | None) -> None:
        """Say when the cores trained on change (nn/cores.py)."""
        if change:
            self.reporter.notice(sharing_line(*change, self.run_dir.name))

    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.cfg.steps

    def log(self, loss_sum: torch.Tensor, lr: float, wd: float, grad_norm: torch.Tensor,
            columns: dict) -> None:
        loss_sum = dist.all_sum(loss_sum)
        elapsed = time.perf_counter() - self.window_start
        if self.share.is_main:  # tokens are the whole batch's: tok/s is global
            row = {"step": self.step, "split": "train",
                   "loss": loss_sum.item() / self.cfg.grad_accum, "lr": lr, "wd": wd,
                   "grad_norm": grad_norm.item(), "tokens": self.tokens,
                   "tok_per_s": self.window_tokens / max(elapsed, 1e-9), "time": time.time(),
                   **columns}
            if self.nonfinite["total"]:
                row["skipped_steps"] = self.nonfinite["total"]
            self.metrics.write(row)
            self.reporter.log(row)
            self.state.update(status="running", step=self.step, total_steps=self.cfg.steps,
                              loss=row["loss"], tok_per_s=row["tok_per_s"],
                              **self.clock.read(self.tokens))
        self.restart_window()

    def evaluate(self, autocast) -> None:
        if not self.share.is_main:  # the others go on to the next step and wait for rank 0 there
            return
        started = time.perf_counter()
        with self.health.watching_inputs():
            measured = self.task.evaluate(self.model, self.device, autocast)
        row = {"step": self.step, "split": "eval", "tokens": self.tokens, "time": time.time(),
               **measured, "eval_s": time.perf_counter() - started}
        row["ppl"] = math.exp(min(row["loss"], 50.0))
        self.metrics.write(row)
        if self.health.active:
            self.metrics.write({**self.health.measure(self.step), "tokens": self.tokens,
                                "time": row["time"]})
        self.reporter.eval(row)
        self.last_eval = row

    def save(self) -> None:
        if self.share.is_main:
            model, step = self.model, self.step
            if not bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all()):
                raise BitnetError(f"run {self.run_dir.name} diverged: its weights are not finite "
                                  f"at step {step}, so they were not saved; {lower_lr(self.cfg)}")
            trainer = {"step": step, "tokens": self.tokens, "data": self.stream.state_dict(),
                       "rng": rng_state(), "nonfinite": dict(self.nonfinite),
                       "run_id": self.run_dir.name, "saved_at": now_iso(),
                       "model": self.config["model"], "experiment": self.config["experiment"]}
            path = save_checkpoint(self.run_dir / "checkpoints", step, model, self.optimizer,
                                   trainer, self.cfg.keep_checkpoints,
                                   tokenizer=self.run_dir / TOKENIZER_FILE)
            self.reporter.checkpoint(step, path)
        self.saved_step = self.step  # only once the checkpoint is on disk

    def stopped(self) -> None:
        """The loop has ended: finished, or stopped early by a signal (with a checkpoint)."""
        if self.step < self.cfg.steps:  # some rank was asked to stop
            if self.saved_step != self.step:
                self.save()
            self.status = "interrupted"
        else:
            self.status = "finished"

    @contextlib.contextmanager
    def recording(self):
        """Around the loop: a second Ctrl-C keeps the last checkpoint; an error the user can act
        on becomes one line; whatever happens, state.json says how the session ended."""
        error = None
        try:
            yield
        except KeyboardInterrupt:
            self.status = "interrupted"
        except BaseException as e:
            failure = user_error(e, self.run_dir, self.cfg, self.model, self.step)
            error = str(failure) if failure else f"{type(e).__name__}: {e}"
            if failure:
                raise failure from None
            raise
        finally:
            if self.cores:  # a process that goes on (a test's) gets every core back
                self.cores.stop()
            if self.share.is_main:
                with contextlib.suppress(OSError):  # a full disk: nothing more can be recorded
                    self.metrics.close()
                    self.state.update(status=self.status, step=self.step,
                                      total_steps=self.cfg.steps, error=error,
                                      checkpoint_step=self.saved_step,
                                      **self.clock.read(self.tokens))

    def finish(self) -> dict:
        info = {"run_id": self.run_dir.name, "run_dir": str(self.run_dir), "status": self.status,
                "step": self.step, "checkpoint_step": self.saved_step,
                "last_eval": self.last_eval, "headline": self.task.headline,
                **self.clock.read(self.tokens)}
        self.reporter.finish(info)
        return info


def sharing_line(used: int, allowed: int, run_id: str) -> str:
    """What the live view says when the cores a CPU run trains on change."""
    if used == allowed:
        return f"all {allowed} cores are free again: training on every one"
    busy = allowed - used
    line = (f"sharing the CPU: other work keeps {busy} of the {allowed} cores busy, so training "
            f"keeps to the other {used} while {'it is' if busy == 1 else 'they are'} (the same "
            "weights, fewer tokens/s)")
    if threads_sleep_waiting():
        return line
    # OpenMP chose how its threads wait when this process started, on a free CPU.
    return (f"{line}; this run began on a free CPU, so its threads take turns slowly: Ctrl-C "
            f"and `bitnet resume {run_id}` go on at the shared pace")


def lower_lr(cfg) -> str:
    return f"train again with a lower --lr (this run's is {cfg.lr:g})"


def user_error(e: BaseException, run_dir: Path, cfg, model, step: int) -> BitnetError | None:
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
        # What state.json says, unless it cannot be a run's time (damaged, or planted)
        ok = real(elapsed_before) and 0 <= elapsed_before < MAX_RUN_TIME_S
        self.before = float(elapsed_before) if ok else 0.0
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
