"""What a run looks like at a glance: the data behind `bitnet status`. No torch here, so status
answers instantly even while a run trains."""

from __future__ import annotations

from pathlib import Path

from bitnet_cli.config.numbers import format_count, real
from bitnet_cli.config.reading import check_fields, model_config_from_dict, train_config_from_dict
from bitnet_cli.errors import BitnetError
from bitnet_cli.store.metrics import (TERNARY_METRICS, TERNARY_SPLIT, per_layer, read_metrics,
                               read_metrics_tail)
from bitnet_cli.store.runs import (CHECKPOINTS_FOLDER, CONFIG_FILE, METRICS_FILE, STATE_FILE,
                                  list_run_dirs, read_json, run_status)

SPARK_LEVELS = "▁▂▃▄▅▆▇█"
CONFIG_FIELDS = {"experiment": "text", "size": "text", "model": "object", "train": "object",
                 "num_params": "count?", "headline": "text?", "argv": "texts?",
                 "created_at": "text?", "imported": "object?", "kind": "text?",
                 "converted": "object?"}
# An imported run (`bitnet import`) has no experiment, size or training of its own; one imported
# before config.json said "kind" has a stand-in training section, never shown.
IMPORTED_FIELDS = {**CONFIG_FIELDS, "experiment": "text?", "size": "text?", "train": "object?",
                   "imported": "object"}
ABOUT_FIELDS = {"source": "text?", "layout": "text?", "quantization": "text?"}
STATE_FIELDS = {"status": "text?", "step": "count?", "total_steps": "count?", "pid": "pid?",
                "host": "text?", "device": "text?", "error": "text?", "updated_at": "text?",
                "updated_unix": "number?", "world_size": "count?", "tok_per_s": "number?",
                "elapsed_s": "number?", "avg_tok_per_s": "number?"}


def read_run(run_dir: Path) -> tuple[dict, dict, str | None]:
    """(config.json, state.json, None), each checked field by field; ({}, {}, why) when either
    is damaged, so that one broken run never breaks the others' rows."""
    try:
        path = run_dir / CONFIG_FILE
        config = read_json(path)
        imported = "imported" in config
        check_fields(config, IMPORTED_FIELDS if imported else CONFIG_FIELDS, path)
        model_config_from_dict(config["model"], path)
        if imported:
            check_fields(config["imported"], ABOUT_FIELDS, path)
        else:
            train_config_from_dict(config["train"], path)
        try:
            state = read_json(run_dir / STATE_FILE)
        except FileNotFoundError:
            state = {}
        check_fields(state, STATE_FIELDS, run_dir / STATE_FILE)
    except FileNotFoundError as e:
        return {}, {}, f"{e.filename} is missing"
    except OSError as e:
        return {}, {}, f"cannot read {e.filename}: {e.strerror}"
    except BitnetError as e:
        return {}, {}, str(e)
    return config, state, None


def summarize(run_dir: Path) -> dict:
    """One run's row: identity, progress, latest loss and eval metric, speed, ETA, status; a
    run whose files are damaged is 'damaged', with the reason as its error."""
    return _row(run_dir, *read_run(run_dir))


def _row(run_dir: Path, config: dict, state: dict, problem: str | None) -> dict:
    imported = config.get("imported")
    train = {} if imported else config.get("train", {})
    rows = read_metrics_tail(run_dir / METRICS_FILE)
    last_train = next((r for r in reversed(rows) if r.get("split") == "train"), {})
    last_eval = next((r for r in reversed(rows) if r.get("split") == "eval"), {})
    headline = config.get("headline", "loss")
    status = "damaged" if problem else run_status(state, run_dir) if state else "unknown"
    step = max(state.get("step") or 0, last_train.get("step") or 0)
    total = state.get("total_steps") or train.get("steps")
    if imported:  # trained elsewhere: no steps here to count
        step = total = None
    tok_per_s = last_train.get("tok_per_s")
    # The ETA goes by the session's average, evaluations and checkpoints included: the last
    # interval's speed alone would promise too early an end.
    pace = state.get("avg_tok_per_s") or tok_per_s
    tokens_per_step = (train.get("batch_size") or 0) * (train.get("seq_len") or 0) * \
        (train.get("grad_accum") or 1)
    eta = None
    if status == "running" and pace and pace > 0 and total:
        eta = max(total - step, 0) * tokens_per_step / pace
    return {
        "run_id": run_dir.name,
        "path": str(run_dir),
        "kind": "imported" if imported else "trained" if config else None,
        "experiment": None if imported else config.get("experiment"),
        "size": None if imported else config.get("size"),
        "imported": imported,
        "quant": config.get("model", {}).get("quant"),
        "init_from": train.get("init_from"),
        "converted": config.get("converted"),
        "teacher": distillation(train),
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
        "avg_tok_per_s": state.get("avg_tok_per_s"),
        "elapsed_s": state.get("elapsed_s"),
        "world_size": state.get("world_size", 1),
        "eta_s": eta,
        "updated_at": state.get("updated_at"),
        "updated_unix": state.get("updated_unix"),
        "device": state.get("device"),
        "host": state.get("host"),
        "pid": state.get("pid"),
        "error": problem or state.get("error"),
    }


def distillation(train: dict) -> dict | None:
    """A distilled run's teacher (its checkpoint folder) and settings; None without one."""
    if not train.get("teacher"):
        return None
    return {"path": train["teacher"], "weight": train.get("distill_weight"),
            "temperature": train.get("distill_temperature"), "layer": train.get("distill_layer"),
            "attention_weight": train.get("distill_attention_weight")}


def teacher_settings(teacher: dict) -> str:
    """'weight 10, temperature 5, layer -1 relations at weight 1': how a run distils."""
    def shown(key: str) -> str:
        return f"{teacher[key]:g}" if real(teacher.get(key)) else "?"
    return (f"weight {shown('weight')}, temperature {shown('temperature')}"
            + (f", layer {teacher['layer']} relations at weight {shown('attention_weight')}"
               if teacher.get("layer") is not None else ""))


def origin_line(row: dict) -> str | None:
    """'converted to ternary from PATH (sub-norms inserted)' or 'fine-tuned from PATH'; None for
    a run trained from scratch."""
    if not row.get("init_from"):
        return None
    converted = row.get("converted")
    if not isinstance(converted, dict):
        return f"fine-tuned from {row['init_from']}"
    inserted = " (sub-norms inserted)" if converted.get("sub_norms_inserted") else ""
    return f"converted to ternary from {row['init_from']}{inserted}"


def checkpoint_label(path: str) -> str:
    """A checkpoint folder by its run and step ('tiny-fp/step_000100'), else its own name."""
    folder = Path(path)
    in_run = folder.parent.name == CHECKPOINTS_FOLDER
    return f"{folder.parent.parent.name}/{folder.name}" if in_run else folder.name


def imported_about(checkpoint: Path) -> dict | None:
    """An imported model's {source, layout, quantization}, from its checkpoint's trainer.json;
    None for a model trained here (or a trainer.json that does not say)."""
    try:
        about = read_json(checkpoint / "trainer.json").get("imported")
    except (OSError, BitnetError):
        return None
    return about if isinstance(about, dict) else None


def source_line(about: dict) -> str:
    """'from /models/2B4T, bitnet layout, packed weights': where an imported model came from."""
    return (f"from {about.get('source') or '?'}, {about.get('layout') or '?'} layout, "
            f"{weights_word(about)} weights")


def source_name(about: dict) -> str:
    """The source's own name: a folder's, or a hub id's last part."""
    return str(about.get("source") or "?").rstrip("/").split("/")[-1]


def weights_word(about: dict) -> str:
    """'packed' (2-bit codes and a scale), 'latent' (weights quantized as they are read) or
    'full-precision' (a Llama's, never quantized)."""
    quantization = about.get("quantization")
    if quantization == "online":
        return "latent"
    if quantization == "none":
        return "full-precision"
    return "packed" if isinstance(quantization, str) and quantization.startswith("offline") \
        else str(quantization or "?")


def shape_line(model: dict, params) -> str:
    """'2.41B params, 30 layers x 2560, 20/5 heads, context 4096, vocab 128256, relu2'."""
    return (f"{format_count(params) if real(params) else '?'} params, "
            f"{model.get('num_hidden_layers')} layers x {model.get('hidden_size')}, "
            f"{model.get('num_attention_heads')}/{model.get('num_key_value_heads')} heads, "
            f"context {model.get('max_position_embeddings')}, vocab {model.get('vocab_size')}, "
            f"{model.get('activation', 'relu2')}")


def model_label(loaded) -> str:
    """How chat and eval name a loaded model: 'arithmetic model, step 5000', or an imported one
    by name and source (its step 0 is no training of bitnet's)."""
    about = imported_about(loaded.checkpoint)
    if about is None:
        return f"{loaded.experiment} model, step {loaded.step}"
    return f"imported model {imported_name(loaded.checkpoint, about)} ({source_line(about)})"


def imported_name(checkpoint: Path, about: dict) -> str:
    """Its run's name; a checkpoint folder outside a run goes by its source's."""
    in_run = checkpoint.parent.name == "checkpoints"
    return checkpoint.parent.parent.name if in_run else source_name(about)


def summarize_all() -> list[dict]:
    return [summarize(run_dir) for run_dir in list_run_dirs()]


def detail(run_dir: Path, recent: int = 8) -> dict:
    """Everything `bitnet status RUN` shows: the summary, the configuration, recent metrics,
    the checkpoints on disk and a sparkline of the training loss."""
    rows = read_metrics(run_dir / METRICS_FILE)
    train_rows = [r for r in rows if r.get("split") == "train"]
    eval_rows = [r for r in rows if r.get("split") == "eval"]
    ternary_rows = [r for r in rows if r.get("split") == TERNARY_SPLIT]
    config, state, problem = read_run(run_dir)
    return {
        **_row(run_dir, config, state, problem),
        "model": config.get("model", {}),
        "train": {} if "imported" in config else config.get("train", {}),
        "argv": config.get("argv"),
        "created_at": config.get("created_at"),
        "recent_train": train_rows[-recent:],
        "recent_eval": eval_rows[-recent:],
        "recent_ternary": [{key: r[key] for key in ("step", "flips_since", *TERNARY_METRICS)
                            if key in r} for r in ternary_rows[-recent:]],
        "ternary_layers": _layers(ternary_rows[-1]) if ternary_rows else {},
        "checkpoints": checkpoints(run_dir),
        "loss_sparkline": sparkline([r["loss"] for r in train_rows if "loss" in r]),
    }


def _layers(row: dict) -> dict[str, dict]:
    """A ternary row's per-layer metrics as {layer: {metric: value}}, in the model's order."""
    layers: dict[str, dict] = {}
    for metric in TERNARY_METRICS:
        for layer, value in per_layer(row, metric).items():
            layers.setdefault(layer, {})[metric] = value
    return layers


def checkpoints(run_dir: Path) -> list[dict]:
    folder = run_dir / "checkpoints"
    try:
        latest = (folder / "latest").read_text(errors="replace").strip()
    except OSError:
        latest = None
    found = []
    for path in sorted(folder.glob("step_*")) if folder.is_dir() else []:
        if not path.is_dir() or path.is_symlink() or path.name.endswith(".partial"):
            continue
        try:
            trainer = read_json(path / "trainer.json")
        except (OSError, BitnetError):
            trainer = {}
        step, saved_at = trainer.get("step"), trainer.get("saved_at")
        found.append({
            "name": path.name,
            "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
            "saved_at": saved_at if isinstance(saved_at, str) else None,
            "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
            "latest": path.name == latest,
            "complete": all((path / f).is_file() for f in
                            ("model.safetensors", "optim.safetensors", "trainer.json")),
        })
    return found


def sparkline(values: list[float], width: int = 60) -> str:
    """The values squeezed into `width` block characters (each the mean of its bucket)."""
    values = [v for v in values if real(v)]
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
