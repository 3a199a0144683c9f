"""Pictures in plain characters: curves for `plot` and `compare`, the tic-tac-toe board."""

from __future__ import annotations

from rich.text import Text


CHART_MARKERS = "•ox+*#@%"


def terminal_chart(series: list[tuple[str, list[tuple[float, float]]]], width: int = 72,
                   height: int = 16, log_y: bool = False) -> Text:
    """A scatter-line chart in plain characters: one marker per series, axes labelled."""
    import math
    points = [(x, y) for _, pts in series for x, y in pts if not log_y or y > 0]
    if not points:
        return Text("(nothing to draw yet)")
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [x for x, _ in points]
    ys = [ty(y) for _, y in points]
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = _y_range(min(ys), max(ys), log_y)
    grid = [[" "] * width for _ in range(height)]
    colours = ["cyan", "magenta", "yellow", "green", "red", "blue", "white", "bright_black"]
    owner = [[None] * width for _ in range(height)]
    for index, (_, pts) in enumerate(series):
        for x, y in pts:
            if log_y and y <= 0:
                continue
            col = round((x - x0) / (x1 - x0) * (width - 1))
            row = height - 1 - round((ty(y) - y0) / (y1 - y0) * (height - 1))
            grid[row][col] = CHART_MARKERS[index % len(CHART_MARKERS)]
            owner[row][col] = index
    label = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    text = Text()
    for r in range(height):
        value = y1 - (y1 - y0) * r / (height - 1)
        text.append(f"{label(value) if r in (0, height // 2, height - 1) else '':>8} │")
        for c in range(width):
            index = owner[r][c]
            text.append(grid[r][c], style=colours[index % len(colours)] if index is not None else "")
        text.append("\n")
    text.append(" " * 9 + "└" + "─" * width + "\n")
    text.append(f"{'step':>9} {x0:<{width // 2}.0f}{x1:>{width - width // 2}.0f}\n")
    for index, (name, _) in enumerate(series):
        text.append(f"  {CHART_MARKERS[index % len(CHART_MARKERS)]} {name}\n",
                    style=colours[index % len(colours)])
    return text


def _y_range(low: float, high: float, log_y: bool) -> tuple[float, float]:
    """The y-axis for values from `low` to `high`. A flat curve (one evaluation, or a share
    such as tic-tac-toe's unbeaten at 1.0 every time) gets an axis from zero to its value, so
    it reads as 1 and not as the bottom of a 1-to-2 axis; on a log axis, a decade around it."""
    if high > low:
        return low, high
    if log_y:
        return low - 0.5, high + 0.5
    return (min(low, 0.0), max(high, 0.0)) if low != 0 else (0.0, 1.0)


def board_text(board: str) -> Text:
    """A tic-tac-toe board ("X.O......", row by row): X and O in colour, each free cell shown
    by its number, which is what the person types to take it."""
    marks = {"X": "bold cyan", "O": "bold magenta"}
    text = Text()
    for row in range(3):
        for col in range(3):
            cell = row * 3 + col
            mark = board[cell]
            text.append(f" {mark} " if mark in marks else f" {cell + 1} ", style=marks.get(mark, "dim"))
            text.append("│" if col < 2 else "\n")
        if row < 2:
            text.append("───┼───┼───\n")
    return text
