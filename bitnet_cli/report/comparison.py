"""`bitnet compare`: runs of one experiment side by side on their held-out metrics, against steps
and against tokens, the first run the yardstick (a BitNet run beside its --quant none twin is
the comparison that matters). Reads metrics.jsonl and config.json only: no torch here."""

from __future__ import annotations

from pathlib import Path

from bitnet_cli.errors import BitnetError
from bitnet_cli.store.metrics import read_metrics
from bitnet_cli.store.runs import METRICS_FILE
from bitnet_cli.report.summary import distillation, read_run

# Fields of an eval row that are bookkeeping, not results.
NOT_RESULTS = {"step", "split", "tokens", "time", "eval_s"}


def compare_runs(run_dirs: list[Path]) -> dict:
    """Each run's evaluations and final results, and each final result over the first run's."""
    if len(set(run_dirs)) < len(run_dirs):
        raise BitnetError("a run is named twice; name each run once")
    runs = [_run(run_dir) for run_dir in run_dirs]
    first = runs[0]
    for run in runs[1:]:
        if run["experiment"] != first["experiment"]:
            raise BitnetError(f"run {run['run_id']} is {run['experiment']} and run "
                              f"{first['run_id']} is {first['experiment']}: compare runs of one "
                              "experiment, whose held-out metrics mean the same")
    headline = first["headline"]
    metrics = [headline] + [key for key in first["final"] if key != headline]
    metrics = [m for m in metrics if all(m in run["final"] for run in runs)]
    for run in runs:
        run["ratio"] = {m: _ratio(run["final"][m], first["final"][m]) for m in metrics}
    return {"experiment": first["experiment"], "headline": headline, "metrics": metrics,
            "runs": runs}


def _run(run_dir: Path) -> dict:
    config, _, problem = read_run(run_dir)
    if problem:
        raise BitnetError(f"run {run_dir.name} cannot be compared: {problem}")
    evals = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("split") == "eval"]
    if not evals and "imported" in config:
        raise BitnetError(f"run {run_dir.name} was imported and has no evaluations of its own; "
                          f"measure it with `bitnet eval {run_dir.name} --data PATH`, or compare "
                          "the runs fine-tuned from it")
    if not evals:
        raise BitnetError(f"run {run_dir.name} has no evaluations yet; compare it once it has "
                          f"evaluated (every {config['train'].get('eval_every', '?')} steps)")
    headline = config.get("headline") or "loss"
    last = evals[-1]
    train = config.get("train") or {}  # an imported run may have none
    return {
        "run_id": run_dir.name, "experiment": config["experiment"], "size": config["size"],
        "quant": config["model"].get("quant", "ternary"), "params": config.get("num_params"),
        "init_from": train.get("init_from"), "converted": config.get("converted"),
        "teacher": distillation(train),
        "headline": headline, "step": last["step"], "tokens": last.get("tokens"),
        "final": {k: v for k, v in last.items() if k not in NOT_RESULTS},
        "curve": [{"step": r["step"], "tokens": r.get("tokens"), headline: r.get(headline),
                   "loss": r.get("loss")} for r in evals],
    }


def _ratio(value: float, base: float) -> float | None:
    return value / base if base else None


def figure_runs(comparison: dict) -> list[dict]:
    """The curves as plot.write_figure draws them: the headline metric and the eval loss, each
    against steps and against tokens."""
    headline = comparison["headline"]
    runs = []
    for run in comparison["runs"]:
        panels = {}
        for metric in dict.fromkeys((headline, "loss")):
            for axis in ("step", "tokens"):
                panels[f"eval {metric} by {axis}"] = {
                    f"{run['quant']} {run['size']}": [
                        (point[axis], point[metric]) for point in run["curve"]
                        if point.get(axis) is not None and point.get(metric) is not None]}
        runs.append({"run_id": run["run_id"], "panels": panels})
    return runs
