"""`bitnet bench --serve` (or `--only serve`): `bitnet serve` against llama-cpp-python's server on
the same weights, driven by the same HTTP clients.

A model of the baseline 95M shape with random weights is saved as a run in a temporary folder
(with a made-up byte-level BPE of the preset's 32,000 tokens, so that every token the model
picks is text) and exported as GGUF. `bitnet serve` serves the run and `python -m
llama_cpp.server` the GGUF, each its own process on a free loopback port, with the same context
and the same thread count (the cores torch uses here; llama.cpp's: see below). One client
drives both the same way: at 1, 4 and 8 concurrent streams (a thread each, http.client, a new
connection per request), each stream sends REQUESTS_PER_STREAM streamed /v1/completions
requests one after another, greedy, MAX_TOKENS new tokens, the prompts taken in turn from one
fixed set. Measured at each concurrency:

    tok/s         every streamed token of every request over the wall time from the first
                  request sent to the last stream's end (the aggregate a server gives)
    first token   each request's time from being sent to its first text (p50, p95)
    per stream    each request's own tokens/s after its first token (the median)
    cpu           (JSON only) cores' worth of CPU time the server and the clients (this process)
                  used over the wall time: what the clients took from the server on the same
                  cores

and the ratios: against one stream on the same server, and bitnet against llama-cpp-python's
server at the same concurrency. The servers take turns at each concurrency, so a background
hiccup hits both alike; the numbers are one run's, not a best of several.

llama-cpp-python's server (0.3.x) runs one request at a time: a lock around its one model, no
batching of sequences. It runs with --interrupt_requests False, else each new request would cut
the open stream short (its default, meant for one user), and --logits_all False (bitnet scores
only the prompt's last position too). Its threads: the cores torch uses, as bitnet, unless one
fewer serves a lone request faster on this machine (llama_cpp_threads: both are tried, and the
table says which ran). A reply's tokens are the usage the stream reports (bitnet's, asked for
with stream_options.include_usage, which the other server ignores), else max_tokens where it
finished by length (every reply of the bench, unless one picks the end of text token), else its
chunks with text. The request body is the same for both.

Both servers, and the temporary folder with the run and the GGUF, are gone when the section
ends, however it ends: Ctrl-C and SIGTERM (the command's `stoppable`) reach the cleanup, and a
server whose bench process is killed outright is killed with it (Linux: PR_SET_PDEATHSIG).
The model files and the server processes are serve_processes.py's, the clients
serve_client.py's; here, the section: what runs in which order, and what the records sum to.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bitnet_cli.bench.serve_client import PROMPTS, drive
from bitnet_cli.bench.serve_processes import (CONTEXT, ServerFailed, bitnet_server, byte_bpe,
                                              llama_cpp_server, llama_cpp_settings,
                                              write_gguf_of, write_run)
from bitnet_cli.bench.shapes import build
from bitnet_cli.errors import BitnetError

SHAPE = ("baseline", "95M")
MAX_TOKENS = 128
STREAMS = (1, 4, 8)
REQUESTS_PER_STREAM = 2
PROBE_TOKENS = 32  # of the lone request that picks llama_cpp.server's thread count
RUN_NAME = "serve-bench"
LLAMA_CPP_INSTALL = "pip install 'llama-cpp-python[server]'"


def llama_cpp_threads(gguf: Path, folder: Path, cores: int, progress) -> dict[int, float]:
    """A lone request's tokens/s from llama_cpp.server with `cores` threads and with one fewer:
    its compute threads wait for each other at every operation, spinning, and its server's own
    Python threads (the event loop, the thread that runs the model) need a core between
    tokens too. On a busy machine `cores` threads can make it many times slower (2 cores: 3
    tok/s against 107 with 1 thread, on a machine that other work kept busy); the bench runs it
    with the faster, and says so."""
    rates = {}
    for threads in dict.fromkeys([cores, max(1, cores - 1)]):
        progress(f"serve: llama_cpp.server with {threads} thread{'s' if threads > 1 else ''}")
        with llama_cpp_server(gguf, folder / f"llama-probe-{threads}.log",
                              llama_cpp_settings(threads)) as server:
            url = server.ready.group(1)
            drive(url, 1, 1, 16)  # the first request is slower
            rates[threads] = summary(drive(url, 1, 1, PROBE_TOKENS), 1)["stream_tok_per_s"] or 0.0
    return rates


def cpu_seconds(pid: int) -> dict:
    """CPU time so far of the server process `pid` and of this one (the clients), in seconds
    (the server's only where /proc tells it)."""
    clients = server = None
    with contextlib.suppress(ImportError):  # Windows has no resource module
        import resource
        usage = resource.getrusage(resource.RUSAGE_SELF)
        clients = usage.ru_utime + usage.ru_stime
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"server": server, "clients": clients}


def percentile(values: list[float], share: float) -> float:
    """The `share` quantile, linear between the two nearest (numpy's default)."""
    ordered = sorted(values)
    at = share * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def summary(records: list[dict], streams: int) -> dict:
    """What one concurrency gave: aggregate tokens/s, first-token times, per-request rates."""
    good = [r for r in records if r["status"] == 200 and r["done"] and not r["error"]
            and r["first"] is not None]
    failed = [r for r in records if r not in good]
    tokens = sum(r["tokens"] for r in good)
    wall = max(r["end"] for r in records) - min(r["sent"] for r in records)
    first = [r["first"] - r["sent"] for r in good]
    rates = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in good
             if r["tokens"] > 1 and r["last"] > r["first"]]
    finish: dict[str, int] = {}
    for r in good:
        finish[str(r["finish"])] = finish.get(str(r["finish"]), 0) + 1
    return {"streams": streams, "requests": len(records), "failed": len(failed),
            "failure": (failed[0]["error"] or f"status {failed[0]['status']}") if failed else None,
            "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall if good else 0.0,
            "first_token_p50_s": percentile(first, 0.5) if first else None,
            "first_token_p95_s": percentile(first, 0.95) if first else None,
            "stream_tok_per_s": statistics.median(rates) if rates else None,
            "finish": finish}


def serving(progress=lambda what: None, streams: tuple[int, ...] = STREAMS,
                requests_per_stream: int = REQUESTS_PER_STREAM, max_tokens: int = MAX_TOKENS,
                shape: tuple[str, str] = SHAPE) -> dict:
    """Both servers on the same random weights of `shape`, each concurrency of `streams` (the
    first 1: the ratios' base) in turn, bitnet first then llama-cpp-python's; the ratios added
    to the rows. Without llama-cpp-python's server, its rows say why and bitnet's are measured
    alone."""
    import gc
    import importlib.util

    threads = torch.get_num_threads()
    result = {"shape": " ".join(shape), "threads": threads, "context": CONTEXT,
              "max_tokens": max_tokens, "requests_per_stream": requests_per_stream,
              "prompts": len(PROMPTS), "bitnet": {}, "llama_cpp": {}}
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bitnet-bench-")))
        progress(f"serve: writing a {shape[1]} run and its GGUF")
        model = build(*shape, CONTEXT).eval()
        result["params"] = model.num_params()
        tokenizer = byte_bpe(model.config.vocab_size)
        checkpoint = write_run(folder / RUN_NAME, model, tokenizer, shape[0])
        gguf = write_gguf_of(model, tokenizer, checkpoint, shape[0])
        del model
        gc.collect()
        progress("serve: starting bitnet serve")
        try:
            bitnet = stack.enter_context(bitnet_server(checkpoint, folder / "bitnet.log",
                                                       max(streams)))
        except ServerFailed as e:
            raise BitnetError(f"bench --serve: `bitnet serve` {e}") from None
        result["bitnet"] = {"engine": bitnet.ready.group(2), "max_streams": max(streams),
                            "levels": []}
        servers = {"bitnet": bitnet.ready.group(3)}
        progress("serve: starting llama_cpp.server")
        if importlib.util.find_spec("llama_cpp") is None:
            result["llama_cpp"] = {"missing": f"not installed ({LLAMA_CPP_INSTALL})"}
        else:
            try:
                probes = llama_cpp_threads(gguf, folder, threads, progress)
                best = max(probes, key=probes.get)
                settings = llama_cpp_settings(best)
                llama = stack.enter_context(llama_cpp_server(gguf, folder / "llama.log",
                                                             settings))
                servers["llama_cpp"] = llama.ready.group(1)
                from llama_cpp import __version__
                result["llama_cpp"] = {"version": __version__, "settings": settings,
                                       "thread_probe": {str(n): rate for n, rate in probes.items()},
                                       "batches": False, "gguf_bytes": gguf.stat().st_size,
                                       "levels": []}
            except ServerFailed as e:
                result["llama_cpp"] = {"missing": f"did not serve: {e} ({LLAMA_CPP_INSTALL})"}
        for name, url in servers.items():  # the first requests are slower: not measured
            drive(url, 1, 1, 16)
        pids = {"bitnet": bitnet.process.pid}
        if "llama_cpp" in servers:
            pids["llama_cpp"] = llama.process.pid
        for count in streams:
            for name, url in servers.items():
                progress(f"serve: {count} stream{'s' if count > 1 else ''}, {name}")
                time.sleep(1)  # the other server's threads idle (spinning ends) first
                before = cpu_seconds(pids[name])
                row = summary(drive(url, count, requests_per_stream, max_tokens), count)
                after = cpu_seconds(pids[name])
                row["cpu"] = {part: (after[part] - before[part]) / row["wall_s"]
                              for part in after if after[part] is not None}
                result[name]["levels"].append(row)
    for name in servers:
        rows = result[name]["levels"]
        for row in rows:
            row["vs_one_stream"] = row["tok_per_s"] / rows[0]["tok_per_s"] \
                if rows[0]["tok_per_s"] else None
    if "levels" in result["llama_cpp"]:
        for mine, theirs in zip(result["bitnet"]["levels"], result["llama_cpp"]["levels"]):
            mine["vs_llama_cpp"] = mine["tok_per_s"] / theirs["tok_per_s"] \
                if theirs["tok_per_s"] else None
    return result
