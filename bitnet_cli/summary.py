"""What a run looks like at a glance: the data behind `bitnet status`. No torch here, so status
answers instantly even while a run trains."""

from __future__ import annotations

import json
from pathlib import Path

from bitnet_cli.metrics import read_metrics, read_metrics_tail
from bitnet_cli.runs import (CONFIG_FILE, METRICS_FILE, STATE_FILE, list_run_dirs, read_json,
                             run_status)

SPARK_LEVELS = "▁▂▃▄▅▆▇█"


def _read_json_or_empty(path: Path) -> dict:
    try:
        data = read_json(path)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def summarize(run_dir: Path) -> dict:
    """One run's row: identity, progress, latest loss and eval metric, speed, ETA, status."""
    config = _read_json_or_empty(run_dir / CONFIG_FILE)
    state = _read_json_or_empty(run_dir / STATE_FILE)
    train = config.get("train", {})
    rows = read_metrics_tail(run_dir / METRICS_FILE)
    last_train = next((r for r in reversed(rows) if r.get("split") == "train"), {})
    last_eval = next((r for r in reversed(rows) if r.get("split") == "eval"), {})
    headline = config.get("headline", "loss")
    status = run_status(state) if state else "unknown"
    step = max(state.get("step") or 0, last_train.get("step") or 0)
    total = state.get("total_steps") or train.get("steps")
    tok_per_s = last_train.get("tok_per_s")
    tokens_per_step = (train.get("batch_size") or 0) * (train.get("seq_len") or 0) * \
        (train.get("grad_accum") or 1)
    eta = None
    if status == "running" and tok_per_s and total:
        eta = (total - step) * tokens_per_step / tok_per_s
    return {
        "run_id": run_dir.name,
        "path": str(run_dir),
        "experiment": config.get("experiment"),
        "size": config.get("size"),
        "quant": config.get("model", {}).get("quant"),
        "params": config.get("num_params"),
        "status": status,
        "step": step,
        "total_steps": total,
        "loss": last_train.get("loss"),
        "eval_metric": headline,
        "eval_value": last_eval.get(headline),
        "eval_loss": last_eval.get("loss"),
        "eval_step": last_eval.get("step"),
        "tok_per_s": tok_per_s,
        "world_size": state.get("world_size", 1),
        "eta_s": eta,
        "updated_at": state.get("updated_at"),
        "updated_unix": state.get("updated_unix"),
        "device": state.get("device"),
        "host": state.get("host"),
        "pid": state.get("pid"),
        "error": state.get("error"),
    }


def summarize_all() -> list[dict]:
    return [summarize(run_dir) for run_dir in list_run_dirs()]


def detail(run_dir: Path, recent: int = 8) -> dict:
    """Everything `bitnet status RUN` shows: the summary, the configuration, recent metrics,
    the checkpoints on disk and a sparkline of the training loss."""
    rows = read_metrics(run_dir / METRICS_FILE)
    train_rows = [r for r in rows if r.get("split") == "train"]
    eval_rows = [r for r in rows if r.get("split") == "eval"]
    config = _read_json_or_empty(run_dir / CONFIG_FILE)
    return {
        **summarize(run_dir),
        "model": config.get("model", {}),
        "train": config.get("train", {}),
        "argv": config.get("argv"),
        "created_at": config.get("created_at"),
        "recent_train": train_rows[-recent:],
        "recent_eval": eval_rows[-recent:],
        "checkpoints": checkpoints(run_dir),
        "loss_sparkline": sparkline([r["loss"] for r in train_rows if "loss" in r]),
    }


def checkpoints(run_dir: Path) -> list[dict]:
    folder = run_dir / "checkpoints"
    pointer = folder / "latest"
    latest = pointer.read_text().strip() if pointer.is_file() else None
    found = []
    for path in sorted(folder.glob("step_*")) if folder.is_dir() else []:
        if not path.is_dir() or path.name.endswith(".partial"):
            continue
        trainer = _read_json_or_empty(path / "trainer.json")
        found.append({
            "name": path.name,
            "step": trainer.get("step"),
            "saved_at": trainer.get("saved_at"),
            "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
            "latest": path.name == latest,
            "complete": all((path / f).is_file() for f in
                            ("model.safetensors", "optim.safetensors", "trainer.json")),
        })
    return found


def sparkline(values: list[float], width: int = 60) -> str:
    """The values squeezed into `width` block characters (each the mean of its bucket)."""
    values = [v for v in values if isinstance(v, (int, float)) and v == v]
    if not values:
        return ""
    buckets = min(width, len(values))
    means = []
    for i in range(buckets):
        chunk = values[i * len(values) // buckets:(i + 1) * len(values) // buckets]
        means.append(sum(chunk) / len(chunk))
    low, high = min(means), max(means)
    span = (high - low) or 1.0
    return "".join(SPARK_LEVELS[int((v - low) / span * (len(SPARK_LEVELS) - 1))] for v in means)


def to_json(data) -> str:
    return json.dumps(data, indent=2, default=str)
