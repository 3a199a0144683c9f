"""`bitnet bench --serve`: its numbers from the clients' records, its table, its sections
flag, and its servers and temporary folder gone however it ends. The speed numbers are
measurements to read, never asserted."""

import io
import json
import os
import signal
import subprocess
import sys
import select
from pathlib import Path

import pytest
from rich.console import Console

from bitnet_cli.bench import serve_client, serve_processes, serve_speed
from bitnet_cli.ui.bench_tables import bench_report
from tests.cli import invoke


def record(sent, first, last, end, tokens=8, finish="length", status=200, done=True):
    return {"sent": sent, "first": first, "last": last, "end": end, "tokens": tokens,
            "finish": finish, "status": status, "done": done, "error": None}


def test_a_concurrency_is_summed_from_its_requests():
    records = [record(0.0, 0.1, 0.8, 0.9), record(0.0, 0.3, 1.0, 1.1),
               record(0.2, 0.5, 1.9, 2.0, tokens=4, finish="stop"),
               record(0.1, None, None, 0.4, tokens=0, status=500, done=False)]
    row = serve_speed.summary(records, 3)
    assert row["tokens"] == 20 and row["wall_s"] == 2.0 and row["tok_per_s"] == 10.0
    assert row["requests"] == 4 and row["failed"] == 1 and row["failure"] == "status 500"
    assert row["first_token_p50_s"] == pytest.approx(0.3)
    assert row["first_token_p95_s"] == pytest.approx(0.3)  # of 0.1, 0.3, 0.3
    assert row["stream_tok_per_s"] == pytest.approx(10.0)  # 7 / 0.7, 7 / 0.7, 3 / 1.4
    assert row["finish"] == {"length": 2, "stop": 1}
    assert serve_speed.percentile([1.0, 2.0, 3.0, 4.0], 0.95) == pytest.approx(3.85)


def test_the_made_up_tokenizer_has_the_shape_s_vocabulary_and_reads_words():
    tokenizer = serve_processes.byte_bpe(32000)
    assert tokenizer.get_vocab_size() == 32000 and tokenizer.token_to_id("<|endoftext|>") == 0
    ids = tokenizer.encode(serve_client.PROMPTS[0]).ids
    assert len(ids) < len(serve_client.PROMPTS[0]) / 2
    assert tokenizer.decode(ids) == serve_client.PROMPTS[0]


def level(streams, tok_per_s, **extra):
    return {"streams": streams, "requests": 2 * streams, "failed": 0, "failure": None,
            "tokens": 256 * streams, "wall_s": 1.0, "tok_per_s": tok_per_s,
            "first_token_p50_s": 0.05, "first_token_p95_s": 0.09, "stream_tok_per_s": 40.0,
            "finish": {"length": 2 * streams}, "vs_one_stream": tok_per_s / 50, **extra}


def test_the_serve_table_renders_alone_and_without_llama_cpp():
    result = {"shape": "baseline 95M", "threads": 2, "context": 256, "max_tokens": 128,
              "requests_per_stream": 2, "prompts": 8, "params": 1,
              "bitnet": {"engine": "2bit", "max_streams": 8,
                         "levels": [level(1, 50.0, vs_llama_cpp=1.1),
                                    level(8, 250.0, vs_llama_cpp=5.0)]},
              "llama_cpp": {"version": "0.3.36", "settings": {"n_threads": 1}, "batches": False,
                            "thread_probe": {"2": 3.0, "1": 107.0},
                            "levels": [level(1, 45.0), level(8, 50.0)]}}
    machine = {"threads": 2, "torch": "2", "copy_gb_s": 1.0, "read_gb_s": 2.0, "read_probe": "x"}
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(bench_report({"machine": machine, "serve": result}))
    text = " ".join(console.export_text().split())  # the title wraps at the table's width
    assert "bitnet serve (2bit engine, 2 threads, up to 8 streams" in text
    assert "1 thread (a lone request: 3.0 tok/s with 2, 107.0 tok/s with 1)" in text
    assert "5.00x" in text and "llama.cpp server" in text and "training step" not in text
    result["llama_cpp"] = {"missing": "not installed (pip install 'llama-cpp-python[server]')"}
    console.print(bench_report({"machine": machine, "serve": result}))
    assert "llama-cpp-python not installed" in console.export_text()


def test_only_names_sections_and_a_wrong_one_is_one_line():
    result = invoke("bench", "--only", "decode,nothing", code=1)
    assert result.output.count("\n") == 1 and "not nothing" in result.output
    assert "serve" in result.output
    result = invoke("bench", "--only", "serve", "--device", "cuda", code=1)
    assert "--device cuda" in result.output and result.output.count("\n") == 1


SMALL = dict(streams=(1, 2), requests_per_stream=1, max_tokens=8, shape=("tinystories", "12M"))


@pytest.mark.slow
def test_both_servers_answer_every_stream_and_are_gone_after(monkeypatch):
    started, folders = [], []
    enter = serve_processes.Server.__enter__
    monkeypatch.setattr(serve_processes.Server, "__enter__",
                        lambda self: started.append(self) or enter(self))
    monkeypatch.setattr(serve_speed, "write_run", lambda folder, *a, real=serve_speed.write_run:
                        folders.append(folder.parent) or real(folder, *a))
    result = serve_speed.serving(**SMALL)
    # bitnet's, llama.cpp's with each thread count tried, llama.cpp's that is measured
    assert len(started) == 2 + len(result["llama_cpp"]["thread_probe"])
    assert all(s.process.poll() is not None for s in started)
    assert folders and not folders[0].exists()
    for name in ("bitnet", "llama_cpp"):
        rows = result[name]["levels"]
        assert [row["streams"] for row in rows] == [1, 2]
        assert all(row["failed"] == 0 and row["tokens"] > 0 for row in rows), rows
        assert all(set(row["cpu"]) == {"server", "clients"} for row in rows)
    assert result["bitnet"]["levels"][1]["vs_llama_cpp"] > 0
    assert result["llama_cpp"]["settings"]["interrupt_requests"] is False
    threads = result["threads"]
    assert set(result["llama_cpp"]["thread_probe"]) == {str(threads), str(max(1, threads - 1))}
    assert str(result["llama_cpp"]["settings"]["n_threads"]) in result["llama_cpp"]["thread_probe"]


CHILD = """
import json, sys, threading
from bitnet_cli.bench import serve_processes, serve_speed
enter = serve_processes.Server.__enter__
def told(self):
    enter(self)
    print(json.dumps({"pid": self.process.pid, "log": str(self.log)}), flush=True)
    return self
serve_processes.Server.__enter__ = told
serve_speed.drive = lambda *a, **k: threading.Event().wait()  # until Ctrl-C or death
serve_speed.serving(**json.loads(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["Ctrl-C", "SIGKILL"])
def test_the_servers_go_when_the_bench_is_stopped(sig):
    """Ctrl-C: the bench stops both servers and removes its folder; SIGKILL leaves it no time,
    and the servers die with it all the same (the folder stays: nothing can remove it)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(SMALL)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        servers = [json.loads(child.stdout.readline()) for _ in range(2)]
        folder = Path(servers[0]["log"]).parent
        assert all(alive(s["pid"]) for s in servers) and folder.exists()
        child.send_signal(sig)
        child.wait(60)
        assert all(gone_within(s["pid"], 30) for s in servers)
        assert folder.exists() == (sig == signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
    if sig == signal.SIGKILL:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def gone_within(pid: int, timeout: float) -> bool:
    """Whether the process ends within `timeout` seconds, awaited on its pidfd (readable once
    it has exited, whoever its parent is)."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([handle], [], [], timeout)[0])
    finally:
        os.close(handle)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped by init, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
