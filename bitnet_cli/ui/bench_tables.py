"""`bitnet bench` as Rich tables, the ratio column first."""

from __future__ import annotations


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms"


def _percent(share: float | None) -> str:
    return f"{100 * share:.1f}%" if share is not None else "GPU not in cost's table"


def bench_report(r: dict):
    """`bitnet bench`: one table per measurement, the ratio column first."""
    from rich.console import Group

    if "gpu" in r["machine"]:
        return _train_table(r)
    notes = sorted({note for d in r.get("decode", []) for note in d.get("notes", [])})
    sections = [("train_step", lambda: [_train_table(r)]), ("data", lambda: [_data_table(r)]),
                ("decode", lambda: _decode_tables(r)), ("size", lambda: [_size_table(r)]),
                ("memory", lambda: [_memory_table(r)]), ("kv_cache", lambda: [_cache_table(r)]),
                ("2b4t", lambda: _released_tables(r)), ("serve", lambda: _serve_tables(r))]
    tables = [table for name, render in sections if name in r for table in render()]
    return Group(*tables, *(f"note: {note}" for note in notes))


def _serve_tables(r: dict):
    """bitnet serve and llama-cpp-python's server at each concurrency, bitnet's ratios first."""
    s = r["serve"]
    mine, theirs = s["bitnet"], s["llama_cpp"]
    threads = ""
    if "settings" in theirs:
        ran = theirs["settings"]["n_threads"]
        probe = theirs.get("thread_probe", {})
        threads = f", {ran} thread{'s' if ran > 1 else ''}"
        if len(probe) > 1:
            threads += " (a lone request: " + ", ".join(
                f"{rate:,.1f} tok/s with {n}" for n, rate in probe.items()) + ")"
    table = _table(f"serving the {s['shape']} shape (random weights, context {s['context']}): "
                   f"each stream {s['requests_per_stream']} streamed /v1/completions requests "
                   f"in a row, greedy, {s['max_tokens']} new tokens; bitnet serve "
                   f"({mine['engine']} engine, {s['threads']} threads, up to "
                   f"{mine['max_streams']} streams decoded together) against llama-cpp-python's "
                   f"server on the same weights (GGUF: TQ2_0 codes, F16 embedding; one request "
                   f"at a time{threads}), the same clients",
                   "streams", "server", "tok/s, all streams", "/ 1 stream", "/ llama.cpp server",
                   "first token p50", "first token p95", "tok/s per stream", "requests")
    rows = {"bitnet serve": mine["levels"]}
    if "levels" in theirs:
        rows["llama.cpp server"] = theirs["levels"]
    for index, level in enumerate(mine["levels"]):
        for name, levels in rows.items():
            row = levels[index]
            first = [row["first_token_p50_s"], row["first_token_p95_s"]]
            table.add_row(str(row["streams"]), name, f"{row['tok_per_s']:,.1f}",
                          f"{row['vs_one_stream']:.2f}x" if row.get("vs_one_stream") else "-",
                          f"{row['vs_llama_cpp']:.2f}x" if row.get("vs_llama_cpp") else "-",
                          *(_ms(t) if t is not None else "-" for t in first),
                          f"{row['stream_tok_per_s']:,.1f}" if row["stream_tok_per_s"] else "-",
                          _requests(row))
    if "missing" in theirs:
        table.add_row("-", "llama.cpp server", f"llama-cpp-python {theirs['missing']}",
                      *["-"] * 6)
    return [table]


def _requests(row: dict) -> str:
    """How many requests, and any that failed or stopped before their max_tokens."""
    early = sum(n for reason, n in row["finish"].items() if reason != "length")
    notes = ([f"{row['failed']} failed: {row['failure']}"] if row["failed"] else []) + \
        ([f"{early} stopped early"] if early else [])
    return f"{row['requests']}" + (f" ({'; '.join(notes)})" if notes else "")


def _released_tables(r: dict):
    d, read = r["2b4t"], r["machine"]["read_gb_s"]
    table = _table(f"decode at the shape of {d['shape']} (random weights, {d['threads']} threads;"
                   " llama.cpp on a GGUF of the same shape: TQ2_0 codes, F16 embedding)",
                   "engine", "ms/token", "tok/s", "/ llama.cpp", "weights read", "GB/s",
                   "share of read", "the report's CPU ms/token", "peak RSS")
    for name, e in d["engines"].items():
        table.add_row(f"{name} ({e['engine']})", f"{e['ms_per_token']:.1f}",
                      f"{e['tok_per_s']:.1f}",
                      f"{e['vs_llama_cpp']:.2f}x" if "vs_llama_cpp" in e else "-",
                      _mib(e["weight_bytes_per_token"]), f"{e['gb_s']:.1f}",
                      f"{100 * e['gb_s'] / read:.0f}%", f"{d['reported_ms_per_token']}",
                      _mib(e["peak_rss_bytes"]) if e["peak_rss_bytes"] else "-")
    theirs = d["llama_cpp"]
    if "tok_per_s" in theirs:
        table.add_row("llama.cpp", f"{1e3 / theirs['tok_per_s']:.1f}", f"{theirs['tok_per_s']:.1f}",
                      "1.00x", _mib(theirs["gguf_bytes"]) + " file", *["-"] * 4)
    else:
        table.add_row("llama.cpp", theirs["missing"], *["-"] * 7)
    return table, _parts_table((d["shape"], name, e) for name, e in d["engines"].items()
                               if e["parts_ms"])


def _table(title: str, *columns: str):
    from rich.table import Table
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, column in enumerate(columns):
        t.add_column(column, justify="left" if i == 0 else "right", style="bold" if i == 1 else "")
    return t


def _train_table(r: dict):
    m = r["machine"]
    on_gpu = "gpu" in m
    train = _table("training step (forward + backward + AdamW), BitNet vs its --quant none twin, "
                  "eager and compiled" + (f" ({m['gpu']}, bf16 autocast)" if on_gpu else ""),
                  "shape", "compiled / eager", "BitNet / twin", "compiled BitNet / twin",
                  "BitNet", "twin", "compiled", "compiled twin", "first compiled step",
                  "batch x seq", *(("tok/s", "MFU", "twin tok/s", "twin MFU") if on_gpu else ()))
    for s in r["train_step"]:
        c = s.get("compiled")
        cells = ([f"{c['vs_eager']:.2f}x", f"{s['ratio']:.2f}x", f"{c['ratio']:.2f}x",
                  _ms(s["bitnet_s"]), _ms(s["twin_s"]), _ms(c["bitnet_s"]), _ms(c["twin_s"]),
                  f"{c['first_step_s']:.1f} s"] if c else
                 ["-", f"{s['ratio']:.2f}x", "-", _ms(s["bitnet_s"]), _ms(s["twin_s"]), "-", "-",
                  s["compile_problem"]])
        gpu_cells = ()
        if on_gpu and c:
            gpu_cells = (f"{c['tok_per_s']:,.0f}", _percent(c["mfu"]),
                         f"{c['twin_tok_per_s']:,.0f}", _percent(c["twin_mfu"]))
        train.add_row(s["shape"], *cells, s["batch"], *gpu_cells)
    return train


def _data_table(r: dict):
    data = _table("making one batch on the CPU, between training steps", "experiment and size",
                 "ms per batch", "batch x seq")
    for s in r["data"]:
        data.add_row(s["shape"], f"{s['ms']:.1f}", s["batch"])
    return data


def _decode_tables(r: dict):
    """Decode speed of every engine with the weights it reads and the bandwidth that makes,
    llama.cpp beside them; then the BitLinear layers alone."""
    m = r["machine"]
    decode = _table(f"decode with the KV cache ({m['threads']} threads; this machine reads "
                    f"{m['read_gb_s']:.1f} GB/s, by {m['read_probe']}): 2bit is the CPU default, int8 --engine int8, "
                    "both through the fused step; per-op is the model's forward in eager "
                    "PyTorch (how both decoded before), compiled that forward compiled, int8 "
                    "head --head int8, fp32 and bf16 the float engine; llama.cpp on the same "
                    "weights (TQ2_0 codes, F16 embedding)",
                    "shape", "engine", "tok/s", "ms/token", "/ int8 per-op", "/ llama.cpp",
                    "weights read", "GB/s", "share of read")
    for d in r["decode"]:
        for name, e in d["engines"].items():
            gb_s = e["gb_s"]
            decode.add_row(d["shape"], name, f"{e['tok_per_s']:.1f}", f"{e['ms_per_token']:.2f}",
                           f"{e['vs_int8']:.2f}x",
                           f"{e['vs_llama_cpp']:.2f}x" if "vs_llama_cpp" in e else "-",
                           _mib(e["weight_bytes_per_token"]),
                           f"{gb_s:.1f}" if gb_s else "-",
                           f"{100 * e['share_of_read']:.0f}%" if e.get("share_of_read") else "-")
        theirs = d.get("llama_cpp")
        if theirs and "missing" in theirs:
            decode.add_row(d["shape"], "llama.cpp", f"llama-cpp-python {theirs['missing']}",
                           *["-"] * 6)
        elif theirs:
            decode.add_row(d["shape"], "llama.cpp", f"{theirs['tok_per_s']:.1f}",
                           f"{1e3 / theirs['tok_per_s']:.2f}", "-", "1.00x",
                           _mib(theirs["gguf_bytes"]) + " file", "-", "-")
    layers = _table("the BitLinear layers alone, one token through all of them: ms, and GB/s of "
                    "the weights each engine stores", "shape", "2bit / fp32", "int8 / fp32",
                    "2bit", "int8", "fp32", "2bit GB/s", "int8 GB/s", "fp32 GB/s")
    for d in r["decode"]:
        lay = d["layers"]
        cells = [(lay[name] if name in lay else None) for name in ("2bit", "int8", "float")]
        layers.add_row(f"{d['shape']} ({lay['count']} layers)",
                       *(f"{c['vs_float']:.2f}x" if c else "-" for c in cells[:2]),
                       *(f"{c['ms']:.2f} ms" if c else "-" for c in cells),
                       *(f"{c['gb_s']:.1f}" if c else "-" for c in cells))
    return decode, layers, _parts_table(
        (d["shape"], name, e) for d in r["decode"] for name, e in d["engines"].items())


def _parts_table(rows):
    """Where a token's time goes in the fused step, for each (shape, engine, its row) given."""
    parts = _table("where a token's time goes in the fused step (ms per token)", "shape",
                   "engine", "ms/token", "ternary sums", "head", "attention", "rest",
                   "outside the step")
    for shape, name, e in rows:
        if "parts_ms" in e:
            parts.add_row(shape, name, f"{e['ms_per_token']:.2f}",
                          *(f"{ms:.2f}" for ms in e["parts_ms"].values()))
    return parts


def _size_table(r: dict):
    size = _table("projection weights on disk, fp32 latent vs 2-bit packed (hf-packed)",
                 "shape", "latent / packed", "latent", "packed", "whole file")
    for s in r["size"]:
        size.add_row(s["shape"], f"{s['ratio']:.1f}x", _mib(s["latent_bytes"]),
                     _mib(s["packed_bytes"]), f"{s['file_ratio']:.1f}x smaller")
    return size


def _memory_table(r: dict):
    memory = _table("memory of a fresh process on the baseline 95M shape (RSS; decoding loads a "
                    "checkpoint as chat does)", "process",
                   "peak", "peak above idle", "at the end")
    idle = r["memory"][0]["peak_rss_bytes"]
    for s in r["memory"]:
        what = {"idle": "idle (imports only)", "decode": f"decode, {s['what']}",
                "train": "train, " + ("BitNet" if s["what"] == "ternary" else "twin")}[s["kind"]]
        memory.add_row(what, _mib(s["peak_rss_bytes"]), _mib(s["peak_rss_bytes"] - idle),
                       _mib(s["final_rss_bytes"]))
    return memory


def _cache_table(r: dict):
    kv = r["kv_cache"]
    cache = _table(f"decode {kv['new_tokens']} tokens with the KV cache vs re-running the "
                  "sequence for each (the CPU default engine)", "shape", "cache / none", "cache", "none")
    cache.add_row(kv["shape"], f"{kv['ratio']:.1f}x", f"{kv['cache_tok_per_s']:.1f} tok/s",
                  f"{kv['no_cache_tok_per_s']:.1f} tok/s")
    return cache
