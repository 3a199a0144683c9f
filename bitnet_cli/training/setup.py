"""Everything before the training loop: the device, the checked configuration, the data, a
new run folder that appears whole, and the checks before a run is continued. Knows no Rich and
no argv; loop.py runs what this sets up.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bitnet_cli import __version__
from bitnet_cli.training import dist
from bitnet_cli.store.checkpoint import newest_loadable
from bitnet_cli.config.reading import model_config_from_dict, to_dict, train_config_from_dict
from bitnet_cli.config.building import build_configs
from bitnet_cli.config.settings import MODEL_OPTIONS
from bitnet_cli.config.numbers import format_count
from bitnet_cli.errors import BitnetError, first_line
from bitnet_cli.tasks import load_experiment
from bitnet_cli.store.files import write_json_atomic
from bitnet_cli.store.metrics import check_tensorboard
from bitnet_cli.config.presets import check_experiment
from bitnet_cli.nn.devices import free_memory, resolve_device
from bitnet_cli.report.run_cost import checkpoint_model
from bitnet_cli.training.distill import check_teacher
from bitnet_cli.training.fine_tune import (FINE_TUNE_LR_DIVISOR, check_tokenizer, checkpoint_source,
                                           converts, fine_tune_model)
from bitnet_cli.store.runs import (CONFIG_FILE, TOKENIZER_FILE, StateFile, heartbeat_fresh,
                             new_run_dir, now_iso, on_other_host, read_json, run_status)


def prepare_task(task, cfg, progress=None, tokenizer=None) -> None:
    """Text experiments find or build their token shards and tokenizer (a fine-tune's is its
    model's, `tokenizer`); the synthetic ones make their data as they go and need nothing."""
    if hasattr(task, "prepare"):
        task.prepare(cfg.data, cfg.text_vocab_size, cfg.data_budget, progress, tokenizer)
        return
    if tokenizer is not None:
        check_tokenizer(tokenizer, task.tokenizer(), cfg.experiment)
    if cfg.data is not None:
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
    task, model_cfg, train_cfg = prepare_data(experiment, size, quant, progress, share,
                                              **overrides)
    if not model_cfg.vocab_size:  # a fine-tune's is its model's, a distilled model's its teacher's
        model_cfg.vocab_size = task.tokenizer().get_vocab_size()
    if hasattr(task, "prepare"):  # the text it was prepared for stays the run's data
        train_cfg.data_tokens = train_cfg.data_budget
    check_memory(model_cfg, train_cfg, resolve_device(train_cfg.device), share.world_size)
    with new_run_dir(experiment, train_cfg.size, train_cfg.name) as (run_dir, folder):
        config = run_config(run_dir.name, experiment, task, model_cfg, train_cfg, argv)
        task.tokenizer().save(str(folder / TOKENIZER_FILE))
        StateFile(folder).update(status="created", step=0, total_steps=train_cfg.steps)
        write_json_atomic(folder / CONFIG_FILE, config)
    return run_dir


def prepare_data(experiment: str, size: str | None = None, quant: str | None = None,
                 progress=None, share: dist.Share = dist.Share(), **overrides):
    """Check the configuration, then find or build the run's data: (task, model config, train
    config). Every rank of a torchrun job calls this before any collective, so none waits on
    another's data preparation (they share it through the cache's file lock)."""
    preset = check_experiment(experiment)
    task = load_experiment(experiment)
    source = teacher = None
    if overrides.get("init_from") is not None:  # fine-tuning: the model and tokenizer are its
        source = checkpoint_source(overrides["init_from"])
        overrides["init_from"] = str(source.checkpoint)
        if overrides.get("lr") is None:  # a conversion trains at the recipe's (fine_tune.py)
            overrides["lr"] = (preset.sizes[size or preset.default_size].train["lr"]
                               / (1 if converts(source.model, quant) else FINE_TUNE_LR_DIVISOR))
        # A model flag given that contradicts the source is refused (fine_tune_model).
        given = {"quant": quant, **{name: overrides.get(name) for name in MODEL_OPTIONS
                                    if name != "quant"}}
    if overrides.get("teacher") is not None:
        teacher = checkpoint_source(overrides["teacher"], role="--teacher")
        overrides["teacher"] = str(teacher.checkpoint)
    model_cfg, train_cfg = build_configs(experiment, size, quant=quant, **overrides)
    if source is not None:
        model_cfg = fine_tune_model(source, given, train_cfg.seq_len)
    dist.check_world(share, train_cfg.batch_size, resolve_device(train_cfg.device))
    # A text run without --from reads its data with its teacher's tokenizer, as a fine-tune does.
    reader = source or (teacher if hasattr(task, "prepare") else None)
    prepare_task(task, train_cfg, progress, reader.tokenizer if reader else None)
    if teacher is not None:
        if source is None:  # a model of its own speaks its teacher's vocabulary
            model_cfg.vocab_size = teacher.model.vocab_size
        check_teacher(teacher, model_cfg, task.tokenizer(), train_cfg)
    return task, model_cfg, train_cfg


def run_config(run_id, experiment, task, model_cfg, train_cfg, argv) -> dict:
    """What a new run's config.json holds; a conversion (fine_tune.py) says so."""
    source = checkpoint_model(train_cfg.init_from) if train_cfg.init_from else None
    converted = source is not None and converts(source, model_cfg.quant)
    return {
        "run_id": run_id,
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
        **({"converted": {"from_quant": source.quant, "sub_norms_inserted": not source.sub_norms}}
           if converted else {}),
    }


def check_memory(model_cfg, cfg, device: torch.device, world_size: int) -> None:
    """Refuse, in one line, a step that cannot fit: on a CPU the kernel would kill the process
    mid-step with no word of why. The estimate is bitnet cost's (activations kept for backward)."""
    from bitnet_cli.report.cost import teacher_bytes, training_bytes

    micro_batch = max(cfg.batch_size // world_size, 1)
    # bf16 autocast on CUDA (nn/devices.py); float32 activations everywhere else.
    needed = training_bytes(model_cfg, micro_batch, cfg.seq_len,
                            activation_bytes=2 if device.type == "cuda" else 4)
    if cfg.teacher is not None:  # its trainer.json alone: the checkpoint is checked elsewhere
        needed += teacher_bytes(checkpoint_model(cfg.teacher), micro_batch, cfg.seq_len)
    free = free_memory(device)
    if free is not None and needed > free:
        raise BitnetError(
            f"a training step of {micro_batch} x {cfg.seq_len} tokens through "
            f"{format_count(model_cfg.num_params())} parameters{' and its teacher' if cfg.teacher else ''} needs about {needed / 2**30:.1f} "
            f"GiB, but {device} has {free / 2**30:.1f} GiB free; lower --batch-size "
            "(--grad-accum keeps the effective batch) or --seq-len")


def read_run_config(run_dir: Path):
    """(config.json, its model config, its train config), each checked; one line naming the
    file when anything in it is wrong. An imported run has no train config: None."""
    path = run_dir / CONFIG_FILE
    try:
        config = read_json(path)
    except FileNotFoundError:
        raise BitnetError(f"{run_dir} has no {CONFIG_FILE}: it is not a bitnet run") from None
    return (config, model_config_from_dict(config.get("model"), path),
            None if "imported" in config else train_config_from_dict(config.get("train"), path))


def run_tokenizer(run_dir: Path) -> Tokenizer:
    path = run_dir / TOKENIZER_FILE
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
        raise BitnetError(f"{path} cannot be read ({first_line(e, 120)}); restore it from a "
                          f"checkpoint folder's copy") from None


def prepare_resume(run_dir: Path, steps: int | None = None,
                   share: dist.Share = dist.Share(), tensorboard: bool = False) -> None:
    """Check that a run can be resumed on the processes `share` describes, extend it to
    `steps`, and turn on its TensorBoard log; nothing on disk changes unless every check
    passes. The caller holds the run's lock (see runs.run_lock), so no other process on this
    machine trains it. A run without a checkpoint (created but never started, or killed before
    its first save) starts at step 0: its config is all it needs."""
    config, _, cfg = read_run_config(run_dir)
    if "imported" in config:
        raise BitnetError(f"run {run_dir.name} was imported, not trained here: there is no "
                          "training to resume; chat with it, evaluate it or export it")
    dist.check_world(share, cfg.batch_size, resolve_device(cfg.device))
    state = StateFile(run_dir).state
    run_id = run_dir.name
    if state.get("status") == "running" and on_other_host(state) and heartbeat_fresh(state):
        raise BitnetError(f"run {run_id} is running on {state['host']} (its heartbeat is "
                          "recent); stop it there first, or watch it with `bitnet status --watch`")
    if cfg.tensorboard or tensorboard:  # the extra may have gone since the run was trained
        check_tensorboard()
    path, contents, _ = newest_loadable(run_dir / "checkpoints")
    done = contents[2]["step"] if path is not None else 0
    total = cfg.steps
    changed = dataclasses.replace(cfg, tensorboard=cfg.tensorboard or tensorboard)
    if steps is not None:
        if steps <= done:
            raise BitnetError(f"--steps {steps} is not more than the {done} steps run {run_id} "
                              "has already done")
        if steps != total:
            # The planned schedule is kept; an extension begins where the plan ended (optim.py).
            marks = [m for m in cfg.extended_at if m < steps]
            changed = dataclasses.replace(changed, steps=steps, extended_at=marks + [total]
                                          if steps > total else marks)
            changed.validate()  # before anything is written
    elif done >= total:
        raise BitnetError(f"run {run_id} already finished all {total} steps; pass --steps N "
                          f"(more than {total}) to train it further")
    if changed != cfg:
        write_json_atomic(run_dir / CONFIG_FILE, {**config, "train": to_dict(changed)})


def record_worker_failure(run_dir: Path, failure: str) -> str:
    """After a worker of a multi-process run failed: mark the run failed if rank 0 died before
    it could, and say where the run stands."""
    state = StateFile(run_dir)
    if run_status(state.state, run_dir) in ("crashed", "created", "running"):
        state.update(status="failed", error=failure)
    path, contents, _ = newest_loadable(run_dir / "checkpoints")
    kept = f"last checkpoint at step {contents[2]['step']}" if path else "no checkpoint yet"
    step = state.state.get("step", 0)
    return (f"{failure}, so run {run_dir.name} stopped at step {step} ({kept}); continue it "
            f"with: bitnet resume {run_dir.name}")


def last_world_size(run_dir: Path) -> int:
    """How many processes to resume a run on by default: as many as it last used, when they
    were all on one machine (a multi-node run is resumed with torchrun on each node)."""
    state = StateFile(run_dir).state
    world = state.get("world_size", 1)
    if not isinstance(world, int) or not 1 <= world <= 1024:
        return 1
    return world if world == state.get("local_world_size", world) else 1


BACKGROUND_NICE = 19  # the lowest CPU priority: what a batch job takes


def run_in_background() -> None:
    """Lower every thread of this process to the lowest CPU priority (threads made later
    inherit it). A CPU training run then loses nothing alone, but a chat beside it decodes at
    its quiet speed: measured at 95M on 2 cores beside a 2-thread training run, 0.45 of it at
    equal priority, 1.0 with the run at nice 19. On Linux the nice value is each thread's own,
    so each one in /proc/self/task is lowered; elsewhere the process's. Where it cannot be done,
    nothing changes."""
    if not hasattr(os, "setpriority"):  # Windows
        return
    tasks = Path("/proc/self/task")
    for task_id in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]:
        try:
            os.setpriority(os.PRIO_PROCESS, task_id,
                           max(BACKGROUND_NICE, os.getpriority(os.PRIO_PROCESS, task_id)))
        except OSError:  # a thread that ended meanwhile
            pass
