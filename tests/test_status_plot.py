"""Runs you can watch: status (table, detail, JSON, live) and plot (PNG/SVG and terminal)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from bitnet_cli.store.checkpoint import step_dir_name
from tests.cli import home_at, invoke, wait_until


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """Two finished 20-step runs, trained once for the whole module into their own folder."""
    home = tmp_path_factory.mktemp("two-runs-home")
    with home_at(home):
        for name, quant in [("bitnet", "ternary"), ("twin", "none")]:
            invoke("train", "simple", "--steps", "20", "--batch-size", "8", "--eval-every", "10",
                   "--save-every", "10", "--no-compile", "--quant", quant, "--name", name)
    return home / "runs"


@pytest.fixture
def two_runs(trained_runs, bitnet_home):
    """A copy of the two runs in this test's own BITNET_HOME: the test may change it freely."""
    shutil.copytree(trained_runs, bitnet_home / "runs")
    return bitnet_home


def set_state(home, name, **fields):
    path = home / "runs" / name / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@contextlib.contextmanager
def stand_in_trainer(run_dir):
    """A live process that holds a run as its trainer would: it locks the run folder (flock)
    and its pid is alive. Yields the pid."""
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()")  # hold the lock until killed or told to go
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()


def test_status_reports_every_state(two_runs):
    home = two_runs
    with stand_in_trainer(home / "runs" / "twin") as pid:
        set_state(home, "twin", status="running", pid=pid)
        rows = {r["run_id"]: r for r in json.loads(invoke("status", "--json").stdout)}
    assert rows["bitnet"]["status"] == "finished" and rows["twin"]["status"] == "running"
    assert rows["bitnet"]["step"] == 20 and rows["bitnet"]["total_steps"] == 20
    assert rows["bitnet"]["eval_metric"] == "acc" and 0 <= rows["bitnet"]["eval_value"] <= 1
    assert rows["bitnet"]["params"] > 0 and rows["bitnet"]["tok_per_s"] > 0
    assert rows["twin"]["quant"] == "none" and rows["twin"]["eta_s"] is not None

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    set_state(home, "twin", status="running", pid=dead.pid)
    assert json.loads(invoke("status", "twin", "--json").stdout)["status"] == "crashed"
    set_state(home, "twin", status="interrupted")
    assert json.loads(invoke("status", "twin", "--json").stdout)["status"] == "interrupted"

    table = invoke("status").stdout
    assert "bitnet" in table and "twin" in table and "interrupted" in table and "finished" in table


def test_the_eta_goes_by_the_average_speed_not_the_last_interval(two_runs):
    home = two_runs
    config = json.loads((home / "runs/twin/config.json").read_text())["train"]
    tokens_per_step = config["batch_size"] * config["seq_len"]
    with stand_in_trainer(home / "runs" / "twin") as pid:
        # 10 of 20 steps left; the last interval ran at 10x the run's average pace
        set_state(home, "twin", status="running", pid=pid, step=10, total_steps=20,
                  avg_tok_per_s=tokens_per_step / 2.0, elapsed_s=20.0)
        metrics = home / "runs/twin/metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        rows = [r for r in rows if r["step"] <= 10]
        rows[-1 if rows[-1]["split"] == "train" else -2]["tok_per_s"] = tokens_per_step * 5.0
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        row = json.loads(invoke("status", "twin", "--json").stdout)
        text = invoke("status", "twin").stdout
    assert row["eta_s"] == pytest.approx(20.0)  # 10 steps at 2 s each
    assert row["elapsed_s"] == 20.0
    assert "on average" in text and "training so far, ETA 0:00:20" in text


def test_status_of_one_run_in_detail(two_runs):
    detail = json.loads(invoke("status", "bitnet", "--json").stdout)
    assert [c["name"] for c in detail["checkpoints"]] == [step_dir_name(10), step_dir_name(20)]
    assert detail["checkpoints"][-1]["latest"] and detail["loss_sparkline"]
    assert detail["recent_eval"][-1]["step"] == 20
    text = invoke("status", "bitnet").stdout
    for expected in [step_dir_name(20), "latest", "recent steps", "recent evaluations", "ternary",
                     "short"]:
        assert expected in text


def test_truncated_metrics_and_missing_state_are_tolerated(two_runs):
    home = two_runs
    with open(home / "runs/bitnet/metrics.jsonl", "a") as f:
        f.write('{"step": 25, "split": "tra')  # a crash in the middle of a line
    (home / "runs/twin/state.json").unlink()
    rows = {r["run_id"]: r for r in json.loads(invoke("status", "--json").stdout)}
    assert rows["bitnet"]["step"] == 20
    assert rows["twin"]["status"] == "unknown"
    invoke("plot", "bitnet")


def pixels(png):
    import matplotlib.image
    return matplotlib.image.imread(png)[..., :3]


def test_plot_writes_real_images(two_runs, tmp_path):
    one = tmp_path / "one.png"
    invoke("plot", "bitnet", "--out", str(one))
    data = one.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    both = tmp_path / "both.png"
    invoke("plot", "bitnet", "twin", "--out", str(both))
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A real drawing: 9 inches at 110 dpi, and the second run changes what is drawn.
    assert pixels(one).shape[1] == pixels(both).shape[1] == 990
    assert pixels(one).shape != pixels(both).shape or (pixels(one) != pixels(both)).any()
    svg = tmp_path / "curves.svg"
    invoke("plot", "bitnet", "twin", "--out", str(svg), "--metric", "acc/short")
    drawing = svg.read_bytes()
    assert b"<svg" in drawing[:1000]
    assert b"bitnet: " in drawing and b"twin: " in drawing  # each run's curve in the legend
    assert not list(tmp_path.glob(".*partial*"))


def test_plot_in_the_terminal(two_runs):
    out = invoke("plot", "bitnet", "twin").stdout
    assert "bitnet: train loss (smoothed)" in out and "twin: eval acc" in out and "│" in out


@pytest.mark.parametrize("args, message", [
    (["plot", "nope"], "no run 'nope'"),
    (["plot", "bitnet", "--out", "x.txt"], "must end in one of .png, .svg, .pdf"),
    (["plot", "bitnet", "--out", "/no/such/folder/x.png"], "does not exist"),
    (["plot", "bitnet", "--metric", "colour"], "has no metric 'colour'; it has:"),
    (["status", "nope"], "no run 'nope'"),
    (["status", "--watch", "--json"], "do not go together"),
])
def test_bad_input(two_runs, args, message):
    result = invoke(*args, code=1)
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_status_plot_compare_and_runs_import_no_torch(two_runs, tmp_path):
    code = ("import sys; from bitnet_cli.cli import app\n"
            "for args in (['status'], ['status', 'bitnet'], ['plot', 'bitnet'],"
            " ['plot', 'bitnet', '--metric', 'flips', '--by-layer'], ['compare', 'twin', 'bitnet'],"
            f" ['plot', 'bitnet', '--out', {str(tmp_path / 'x.png')!r}], ['runs', 'list'],"
            " ['runs', 'rm', 'twin', '--yes'], ['train', '--help']):\n"
            "    try:\n        app(args)\n    except SystemExit as e:\n        assert not e.code, e\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


class Reader:
    """Reads a child's stdout on a thread as it comes, so a test can wait for what it expects."""

    def __init__(self, stream):
        self.stream, self.chunks, self.lock = stream, [], threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while chunk := os.read(self.stream.fileno(), 65536):
            with self.lock:
                self.chunks.append(chunk)

    def text(self):
        with self.lock:
            return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, expected, proc, timeout=60):
        wait_until(lambda: expected in self.text(), f"{expected!r} on screen", proc, timeout)


def watch(args: list[str], tmp_path, meanwhile) -> tuple[int, str, str]:
    """`bitnet status --watch ARGS` drawing as in a terminal: once its first drawing shows,
    meanwhile(out) acts and waits for what it expects; then (exit code, stdout, stderr)."""
    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "160"}  # draw as in a terminal
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", "status", *args, "--watch",
                                 "--interval", "0.2"], stdout=subprocess.PIPE, stderr=stderr,
                                env=env)
        try:
            out = Reader(proc.stdout)
            out.wait_for("20/20", proc)  # the first drawing
            meanwhile(out, proc)
            proc.wait(timeout=30)
            out.thread.join(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        stderr.seek(0)
        return proc.returncode, out.text(), stderr.read()


def test_status_watch_updates_live(two_runs, tmp_path):
    def change_a_run(out, proc):
        set_state(two_runs, "twin", status="running", pid=os.getpid(), step=777, total_steps=999)
        out.wait_for("777/999", proc)  # a later drawing shows the change
        proc.send_signal(signal.SIGINT)

    code, text, err = watch([], tmp_path, change_a_run)
    assert code == 0, err
    assert "20/20" in text and "777/999" in text
    assert text.index("777/999") > text.index("20/20")


def test_status_watch_of_a_run_removed_meanwhile_says_it_is_gone(two_runs, tmp_path):
    code, text, err = watch(["twin"], tmp_path,
                            lambda out, proc: shutil.rmtree(two_runs / "runs" / "twin"))
    assert code == 1, err
    assert err.strip().splitlines()[-1] == (
        f"error: run twin is gone: its folder {two_runs / 'runs' / 'twin'} was removed")
    assert "None" not in text.split("20/20", 1)[1]


def test_a_flat_share_is_drawn_against_zero():
    """Tic-tac-toe's unbeaten at 1.0 at every evaluation reads 1 at the top of a 0-to-1 axis,
    not at the bottom of a 1-to-2 one."""
    from bitnet_cli.ui.charts import terminal_chart
    text = terminal_chart([("eval unbeaten", [(100, 1.0), (200, 1.0)])], width=20, height=5).plain
    rows = [line.split("│") for line in text.splitlines() if "│" in line]
    assert [label.strip() for label, _ in rows] == ["1", "", "0.5", "", "0"]
    assert "•" in rows[0][1] and "•" not in "".join(cells for _, cells in rows[1:])
    flat_zero = terminal_chart([("lost", [(1, 0.0), (2, 0.0)])], width=20, height=3).plain
    assert [line.split("│")[0].strip() for line in flat_zero.splitlines() if "│" in line] == [
        "1", "0.5", "0"]
    log_axis = terminal_chart([("loss", [(1, 2.0)])], width=20, height=3, log_y=True).plain
    assert [line.split("│")[0].strip() for line in log_axis.splitlines() if "│" in line] == [
        "6.32", "2", "0.632"]
