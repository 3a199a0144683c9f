"""`bitnet cost --from-run`: a run's model, its steps and the speed it has measured, and the
rest of it projected at that speed. An imported run, never trained here, is priced as a
fine-tune of it; a distilled one with its teacher's model. No torch here."""

from __future__ import annotations

import statistics
from pathlib import Path

from bitnet_cli.config.presets import RELEASED_SHAPES
from bitnet_cli.config.reading import model_config_from_dict
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError
from bitnet_cli.store.metrics import read_metrics
from bitnet_cli.store.runs import CONFIG_FILE, METRICS_FILE, STATE_FILE, read_json
from bitnet_cli.store.selector import resolve_run


def read_run(run: Path) -> tuple[ModelConfig, dict, dict | None]:
    """The run's model, its training batch/steps, and what it has measured so far. An imported
    run trained nothing here: None measured, and a fine-tune of it at its context as its steps
    (`--preset 2b4t`'s, which is one)."""
    try:
        config = read_json(run / CONFIG_FILE)
        cfg = model_config_from_dict(config["model"])
        if "imported" in config:
            fine_tune = RELEASED_SHAPES["2b4t"]["fine_tune"]
            return cfg, dict(fine_tune, seq_len=cfg.max_position_embeddings), None
        train = {k: config["train"][k] for k in ("steps", "batch_size", "seq_len", "grad_accum")}
        train["teacher"] = config["train"].get("teacher")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BitnetError(f"cannot read {run / CONFIG_FILE}: {e}") from None
    try:
        state = read_json(run / STATE_FILE)
    except (OSError, ValueError):  # not written yet: the run has only just been created
        state = {}
    logged = [r for r in read_metrics(run / METRICS_FILE) if r.get("split") == "train"]
    # The median of recent windows: the first one holds compilation, and any one can hiccup.
    rates = [r["tok_per_s"] for r in logged[-20:] if r.get("tok_per_s")]
    step = max([state.get("step") or 0] + [r.get("step", 0) for r in logged])
    measured = {
        "run_id": config.get("run_id", run.name),
        "path": str(run),
        "status": state.get("status"),
        "step": step,
        "tokens_done": logged[-1]["tokens"] if logged and "tokens" in logged[-1]
                       else step * train["batch_size"] * train["seq_len"] * train["grad_accum"],
        "tok_per_s": statistics.median(rates) if rates else state.get("tok_per_s"),
        "device": state.get("device") if isinstance(state.get("device"), str) else None,
    }
    train["steps"] = state.get("total_steps") or train["steps"]  # `resume --steps` may extend it
    return cfg, train, measured


def project_rest(measured: dict, horizon, per_token: int, hardware: list, gpus: int) -> dict:
    """The rest of a run at the speed it has measured so far."""
    rate = measured["tok_per_s"]
    remaining = max(0, horizon.tokens - measured["tokens_done"])
    projection = {**measured, "tokens_total": horizon.tokens, "tokens_remaining": remaining,
                  "remaining_hours": remaining / rate / 3600 if rate else None}
    on_gpu = (measured.get("device") or "").startswith("cuda")
    if hardware and rate and on_gpu:  # a CPU's speed says nothing of a GPU's MFU or price
        g = hardware[0]
        projection["gpu"] = g.name
        projection["measured_mfu"] = rate * per_token / (g.peak_tflops * 1e12 * gpus)
        projection["remaining_dollars"] = projection["remaining_hours"] * gpus * g.price
    return projection


def read_teacher(named: str | None, recorded: str | None) -> tuple[ModelConfig | None, dict | None]:
    """The teacher --teacher names (one that cannot be read is refused), else the run's own (one
    gone is noted and left out): its model, and what the report says of it."""
    where = named or recorded
    if not where:
        return None, None
    try:
        model = checkpoint_model(where)
    except BitnetError as e:
        if named:
            raise BitnetError(f"--teacher {named}: {e}") from None
        return None, {"path": recorded, "missing": str(e)}
    return model, {"path": where, "params": model.num_params(), "layers": model.num_hidden_layers,
                   "hidden": model.hidden_size, "vocab": model.vocab_size}


def checkpoint_model(where: str) -> ModelConfig:
    """The model of a checkpoint folder (a teacher's, a source's), read without torch and
    without reading its tensors: its trainer.json, or else the config.json of the run `where`
    names (as --from-run takes it)."""
    try:
        trainer = Path(where).expanduser() / "trainer.json"
        path = trainer if trainer.is_file() else resolve_run(where) / CONFIG_FILE
        return model_config_from_dict(read_json(path)["model"], path)
    except (OSError, KeyError, TypeError) as e:
        raise BitnetError(f"cannot read the model at {where}: {e}") from None
