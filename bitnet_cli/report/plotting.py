"""Curves from metrics.jsonl: gathered here, drawn to PNG/SVG/PDF with matplotlib (imported only
when a file is written), or handed to ui.py for a chart in the terminal. No torch here."""

from __future__ import annotations

import io
from pathlib import Path

from bitnet_cli.errors import BitnetError
from bitnet_cli.store.files import write_bytes_atomic
from bitnet_cli.store.metrics import TERNARY_METRICS, TERNARY_SPLIT, per_layer, read_metrics
from bitnet_cli.store.runs import CONFIG_FILE, METRICS_FILE, read_json

FORMATS = (".png", ".svg", ".pdf")
SMOOTHING = 0.9  # weight of the past in the exponential moving average of the train loss


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased so the first points are not dragged towards 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def collect(run_dir: Path, metric: str | None = None, by_layer: bool = False) -> dict:
    """The curves of one run. Without `metric`: train loss (raw and smoothed), eval loss, and the
    experiment's headline eval metric. With one: that metric wherever it is logged; a ternary
    metric (zeros, flips, ...) for the whole model, or with `by_layer` one curve per layer."""
    rows = read_metrics(run_dir / METRICS_FILE)
    if not rows:
        raise BitnetError(f"run {run_dir.name} has no metrics yet")
    try:
        config = read_json(run_dir / CONFIG_FILE)
    except (OSError, BitnetError):  # a damaged config.json: the loss curves alone
        config = {}
    headline = config.get("headline")
    headline = headline if isinstance(headline, str) else None
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    ternary = [r for r in rows if r.get("split") == TERNARY_SPLIT]

    def points(source, key):
        return [(r["step"], r[key]) for r in source
                if isinstance(r.get(key), (int, float)) and "step" in r]

    if metric in TERNARY_METRICS:
        if not ternary:
            model = config.get("model")
            why = ("it is a --quant none (full-precision) run, with no ternary codes"
                   if isinstance(model, dict) and model.get("quant") == "none"
                   else "it has not been evaluated yet (or predates these metrics)")
            raise BitnetError(f"run {run_dir.name} has no {metric!r} curve: {why}")
        if by_layer:
            layers = list(dict.fromkeys(layer for r in ternary for layer in per_layer(r, metric)))
            return {"run_id": run_dir.name, "panels": {f"{metric} by layer": {
                layer: points(ternary, f"{metric}/{layer}") for layer in layers}}}
        return {"run_id": run_dir.name, "panels": {metric: {metric: points(ternary, metric)}}}
    if by_layer:
        raise BitnetError(f"--by-layer goes with a ternary metric ({', '.join(TERNARY_METRICS)})")
    if metric:
        found = points(train, metric) or points(evals, metric)
        if not found:
            known = sorted({k for r in train + evals for k, v in r.items()
                            if isinstance(v, (int, float)) and k not in ("step", "time")})
            raise BitnetError(f"run {run_dir.name} has no metric {metric!r}; it has: "
                              f"{', '.join(known + list(TERNARY_METRICS if ternary else []))}")
        return {"run_id": run_dir.name, "panels": {metric: {metric: found}}}
    train_loss = points(train, "loss")
    loss_panel = {
        "train loss": train_loss,
        "train loss (smoothed)": list(zip([s for s, _ in train_loss],
                                          smooth([v for _, v in train_loss]))),
        "eval loss": points(evals, "loss"),
    }
    panels = {"loss": loss_panel}
    if headline and headline != "loss" and points(evals, headline):
        panels[headline] = {f"eval {headline}": points(evals, headline)}
    return {"run_id": run_dir.name, "panels": panels}


def check_out_path(out: Path) -> None:
    if out.suffix.lower() not in FORMATS:
        raise BitnetError(f"--out {out} must end in one of {', '.join(FORMATS)}")
    if not out.parent.is_dir():
        raise BitnetError(f"--out {out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise BitnetError(f"--out {out} is a folder; give a file name like curves.png")


def write_figure(runs: list[dict], out: Path) -> Path:
    """All runs on one figure, one panel per quantity, one colour per run; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_out_path(out)
    panel_names = list(dict.fromkeys(name for run in runs for name in run["panels"]))
    fig = Figure(figsize=(9, 3.6 * len(panel_names)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panel_names), 1, squeeze=False)[:, 0]
    colours = matplotlib.colormaps["tab10"]
    for ax, panel in zip(axes, panel_names):
        for index, run in enumerate(runs):
            for line, (label, pts) in enumerate(run["panels"].get(panel, {}).items()):
                if not pts:
                    continue
                xs, ys = zip(*pts)
                # One colour per run; a single run's curves (per layer, say) one colour each.
                colour = colours((index if len(runs) > 1 else line) % 10)
                ax.plot(xs, ys, color=colour, label=f"{run['run_id']}: {label}", **_style(label))
        ax.set_title(panel)
        ax.set_xlabel("tokens" if panel.endswith(" by tokens") else "step")
        ax.grid(alpha=0.3)
        if panel == "loss" or panel.startswith("eval loss"):
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    image = io.BytesIO()
    fig.savefig(image, dpi=110, format=out.suffix.lower().lstrip("."))
    write_bytes_atomic(out, image.getvalue())
    return out


def _style(label: str) -> dict:
    if label == "train loss":
        return {"alpha": 0.25, "linewidth": 0.8}
    if label.startswith("eval"):
        return {"marker": "o", "markersize": 3, "linewidth": 1.2, "linestyle": "--"}
    return {"linewidth": 1.6}
