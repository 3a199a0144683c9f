"""How a run proceeds: step, log, evaluate, checkpoint, stop. Knows no Rich and no argv.
(What comes before the loop, a run's folder, config and data, is setup.py's; what happens
around each step, saving, evaluating, logging and the heartbeat, is session.py's.)

The loop talks to the screen through a Reporter (see NullReporter for the protocol), so the same
code drives the live terminal view, the tests, and anything else that wants to watch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from bitnet_cli.errors import BitnetError, typed_first_line
from bitnet_cli.nn.bitlinear import quantized_for_step
from bitnet_cli.nn.compiled import training_forward, wants_compile
from bitnet_cli.nn.devices import autocast_for, resolve_device
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.store.checkpoint import (checkpoints_newest_first, load_model_tensors,
                                         load_optimizer_tensors, newest_loadable,
                                         remove_partial_saves, set_rng_state)
from bitnet_cli.store.files import remove_leftovers
from bitnet_cli.store.metrics import truncate_metrics
from bitnet_cli.store.runs import METRICS_FILE, run_lock
from bitnet_cli.tasks import load_experiment
from bitnet_cli.tasks.problems import IGNORE
from bitnet_cli.tasks.rows import DeviceBatches
from bitnet_cli.training import dist
from bitnet_cli.training.distill import Teacher
from bitnet_cli.training.fine_tune import load_source_weights
from bitnet_cli.training.optim import apply_schedule, build_optimizer
from bitnet_cli.training.session import RunSession, stop_signals
from bitnet_cli.training.setup import (check_memory, prepare_task, read_run_config, run_in_background,
                                       run_tokenizer)


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
    if device.type == "cpu" and not cfg.foreground:
        run_in_background()
    dist.check_world(share, cfg.batch_size, device)
    # Before joining the process group, so that no collective waits on it: every process finds
    # or builds the data (one per machine builds it; the others wait on the cache's file lock).
    prepare_task(task, cfg, reporter.preparing,
                 run_tokenizer(run_dir) if cfg.init_from or cfg.teacher else None)
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
    model = BitNetForCausalLM(model_cfg)
    starting = bool(cfg.init_from) and not checkpoints_newest_first(run_dir / "checkpoints")
    if starting and load_source_weights(model, cfg.init_from):  # a fine-tune before its first save
        reporter.notice("the model --from stores its layers as 2-bit codes: training starts "
                        "from latent float32 weights made of them (codes x scale)")
    model.to(device)
    teacher = Teacher(cfg, model_cfg, device) if cfg.teacher else None
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, device.type)
    stream = DeviceBatches(task.stream(cfg.seed, cfg.batch_size, cfg.seq_len, share.rank,
                                       share.world_size), device)
    session, resumed = _resume(run_dir, config, cfg, task, share, device, reporter, model,
                               optimizer, stream)
    trained = dist.wrap(model, share, device)
    if teacher:
        teacher.watch(model)
    forward = training_forward(trained, wants_compile(cfg, device), device, reporter.notice)
    session.start({"compile": forward.compiled, **resumed})
    if starting and "converted" in config:  # what ternarizing the source cost, before any step
        session.evaluate(autocast)
        session.restart_window()
    # DDP averages gradients over ranks; each rank's loss is its share of the sum, so its
    # gradient is scaled back up by the world size (and down by the micro-steps).
    grad_scale = share.world_size / cfg.grad_accum

    with stop_signals() as stop, session.recording():
        model.train()
        session.restart_window()
        while session.step < cfg.steps and not dist.any_rank(bool(stop.requested)):
            lr, wd = apply_schedule(optimizer, session.step, cfg.steps, cfg.lr, cfg.warmup_steps,
                                    cfg.weight_decay, cfg.extended_at)
            loss_sum = torch.zeros((), device=device)
            if teacher:
                teacher.new_step()
            with quantized_for_step(model):
                for micro in range(cfg.grad_accum):
                    inputs, labels = stream.next_batch()
                    # The mean over the whole batch's target tokens, on every rank: a rank's
                    # rows may hold more or fewer answer tokens than another's.
                    targets = dist.all_sum((labels != IGNORE).sum()).clamp(min=1)
                    with dist.gradient_sync(trained, micro == cfg.grad_accum - 1):
                        loss_sum += forward.run(micro_step, inputs, labels, targets,
                                                autocast, grad_scale, teacher)
                    stream.prefetch()  # while a GPU still works on this micro-step
            # A non-finite loss makes a non-finite gradient norm: that step is skipped.
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            session.advance(grad_norm)
            if session.due(cfg.log_every):
                session.log(loss_sum, lr, wd, grad_norm, teacher.log_columns(
                    cfg.grad_accum, dist.all_sum) if teacher else {})
            if session.due(cfg.eval_every):
                session.evaluate(autocast)
            if session.due(cfg.save_every):
                session.save()
            if session.due(cfg.eval_every) or session.due(cfg.save_every):
                session.restart_window()
        session.stopped()
    return session.finish()


def micro_step(model_call, inputs, labels, targets, autocast, grad_scale: float,
               teacher=None) -> torch.Tensor:
    """One micro-batch forward and backward: the loss summed over its target tokens and
    divided by `targets` (the whole batch's, on every rank), its gradient times `grad_scale`;
    with a `teacher`, its distillation terms are added to what is trained (not to the loss
    returned, the cross-entropy every run logs)."""
    with autocast():
        logits = model_call(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum") / targets
    trained = loss + teacher.added_loss(inputs, logits, labels, targets, autocast) \
        if teacher else loss
    (trained * grad_scale).backward()
    return loss.detach()


def _resume(run_dir, config, cfg, task, share, device, reporter, model, optimizer, stream):
    """The session, from the newest good checkpoint if there is one (model, optimizer, data
    cursor and RNG put back), and what the reporter is told of it."""
    resumed_from, contents, skipped = newest_loadable(run_dir / "checkpoints")
    step, tokens, trainer = 0, 0, None
    if resumed_from is not None:
        step, tokens = _restore(resumed_from, contents, model, optimizer, stream, device)
        trainer = contents[2]
    if share.is_main:  # under the run's lock: whatever temporary files are here are a crash's
        remove_leftovers(run_dir, ".*.tmp")
        remove_partial_saves(run_dir / "checkpoints")
        # Rows logged after the checkpoint are about to be trained again: drop them so the
        # file holds each step once, as an uninterrupted run's would.
        # (None: the rows of a start that saved nothing, a conversion's first evaluation too.)
        truncate_metrics(run_dir / METRICS_FILE, step if resumed_from is not None else None)
    session = RunSession(run_dir, config, cfg, task, share, device, reporter, model, optimizer,
                         stream, step, tokens, trainer)
    return session, {"resumed_from": str(resumed_from) if resumed_from else None,
                     "skipped_checkpoints": skipped}


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
        raise BitnetError(f"checkpoint {path} does not fit this run ({typed_first_line(e)}); "
                          "move it away to resume from the one before") from None
