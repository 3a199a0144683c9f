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
    notes = sorted({note for d in r["decode"] for note in d.get("notes", [])})
    return Group(_train_table(r), _data_table(r), *_decode_tables(r), _size_table(r),
                 _memory_table(r), _cache_table(r), *(f"note: {note}" for note in notes))


def _table(title: str, *columns: str):
    from rich.table import Table
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, column in enumerate(columns):
        t.add_column(column, justify="left" if i == 0 else "right", style="bold" if i == 1 else "")
    return t


def _rate(d: dict, name: str) -> str:
    engine = d["engines"].get(name)
    return f"{engine['tok_per_s']:.1f}" if engine else "-"


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
    """Decode speed, the bandwidth it reaches, the BitLinear layers alone, and llama.cpp."""
    m = r["machine"]
    decode = _table("decode with the KV cache, tokens/s: the int8 engine (float16 head, or int8 "
                   "with --head int8; eager, or compiled with chat --compile) and the float "
                   f"engine in fp32 and bf16 autocast ({m['threads']} threads)", "shape",
                   "int8 / fp32", "compiled / fp32", "int8", "int8 head", "compiled",
                   "compiled, int8 head", "fp32", "bf16")
    bandwidth = _table(f"weights read per decoded token, and the bandwidth that makes (this machine: "
                      f"reads {m['read_gb_s']:.1f} GB/s, copies {m['copy_gb_s']:.1f} GB/s)",
                      "shape", "int8 share of read", "int8 GB/s", "compiled, int8 head GB/s",
                      "fp32 GB/s", "int8 weights", "int8-head weights", "fp32 weights")
    layers = _table("the BitLinear layers alone, one token through all of them", "shape",
                   "int8 / fp32", "int8", "fp32", "int8 GB/s", "fp32 GB/s")
    llama = _table("decode beside llama.cpp on the same weights (GGUF: TQ2_0 codes, F16 "
                  "embedding), same prompt, new tokens and threads", "shape", "int8 / llama.cpp",
                  "compiled, int8 head / llama.cpp", "int8", "compiled, int8 head", "llama.cpp",
                  "GGUF")
    for d in r["decode"]:
        e = d["engines"]
        fastest = e.get("int8 compiled, int8 head")
        decode.add_row(d["shape"], f"{d['int8_vs_float32']:.2f}x",
                       f"{e['int8 compiled']['vs_float32']:.2f}x" if "int8 compiled" in e else "-",
                       *(_rate(d, name) for name in ("int8", "int8, int8 head", "int8 compiled",
                                                    "int8 compiled, int8 head", "float32",
                                                    "bf16 autocast")))
        bandwidth.add_row(d["shape"], f"{100 * e['int8']['gb_s'] / m['read_gb_s']:.0f}%",
                          f"{e['int8']['gb_s']:.1f}", f"{fastest['gb_s']:.1f}" if fastest else "-",
                          f"{e['float32']['gb_s']:.1f}", _mib(e["int8"]["weight_bytes_per_token"]),
                          _mib(e["int8, int8 head"]["weight_bytes_per_token"]),
                          _mib(e["float32"]["weight_bytes_per_token"]))
        lay = d["layers"]
        layers.add_row(f"{d['shape']} ({lay['count']} layers)", f"{lay['ratio']:.2f}x",
                       f"{lay['int8_ms']:.2f} ms", f"{lay['float_ms']:.2f} ms",
                       f"{lay['int8_gb_s']:.1f}", f"{lay['float_gb_s']:.1f}")
        theirs = d.get("llama_cpp")
        if theirs is None:
            continue
        if "missing" in theirs:
            llama.add_row(d["shape"], "-", "-", _rate(d, "int8"), _rate(d, "int8 compiled, int8 head"),
                          f"llama-cpp-python {theirs['missing']}", "-")
            continue
        llama.add_row(d["shape"], f"{e['int8']['vs_llama_cpp']:.2f}x",
                      f"{fastest['vs_llama_cpp']:.2f}x" if fastest else "-", _rate(d, "int8"),
                      _rate(d, "int8 compiled, int8 head"), f"{theirs['tok_per_s']:.1f}",
                      _mib(theirs["gguf_bytes"]))
    return decode, bandwidth, layers, llama


def _size_table(r: dict):
    size = _table("projection weights on disk, fp32 latent vs 2-bit packed (hf-packed)",
                 "shape", "latent / packed", "latent", "packed", "whole file")
    for s in r["size"]:
        size.add_row(s["shape"], f"{s['ratio']:.1f}x", _mib(s["latent_bytes"]),
                     _mib(s["packed_bytes"]), f"{s['file_ratio']:.1f}x smaller")
    return size


def _memory_table(r: dict):
    memory = _table("memory of a fresh process on the baseline 95M shape (RSS)", "process",
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
                  "sequence for each (int8 engine)", "shape", "cache / none", "cache", "none")
    cache.add_row(kv["shape"], f"{kv['ratio']:.1f}x", f"{kv['cache_tok_per_s']:.1f} tok/s",
                  f"{kv['no_cache_tok_per_s']:.1f} tok/s")
    return cache
