"""`bitnet export`, `bitnet bench`: take a model to other runtimes, and measure it."""

from __future__ import annotations

from pathlib import Path

import typer

from bitnet_cli.cli import MODEL_HELP, app, friendly


@app.command(rich_help_panel="Shipping")
@friendly
def export(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False),
    format: str = typer.Option(..., "--format", help="hf, hf-packed or gguf."),
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist or be empty)."),
) -> None:
    """Export a model for transformers (latent or 2-bit packed weights) or llama.cpp (GGUF).

    hf: config.json, model.safetensors (latent fp32 weights) and the
    tokenizer; AutoModelForCausalLM.from_pretrained(OUT) loads it.

    hf-packed: the same, with the ternary weights packed 4 per byte as the
    released BitNet b1.58 2B4T checkpoint stores them.

    gguf: OUT/model.gguf for llama.cpp's bitnet architecture, tokenizer inside.

    OUT is written whole or not at all, and never over existing files.
    """
    from bitnet_cli.export import GGUF_FILE, export_model

    written = export_model(model, format, out)
    size = sum(f.stat().st_size for f in written.iterdir())
    how = (f"llama.cpp: llama-cli -m {written / GGUF_FILE}" if format == "gguf" else
           f'transformers: AutoModelForCausalLM.from_pretrained("{written}")')
    typer.echo(f"wrote {written} ({format}, {size / 1e6:.1f} MB); load it with {how}")


@app.command(rich_help_panel="Shipping")
@friendly
def bench(json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """Measure speed side by side in one process: ratios first, absolute numbers beside them.

    decode: greedy generation of 256 tokens on the TinyStories 12M shape (random weights), with
    the KV cache against re-running the whole sequence for every token.
    """
    import json as jsonlib

    from bitnet_cli.bench import NEW_TOKENS, run_all
    from bitnet_cli.ui import stderr

    with stderr.status("measuring (about a minute)..."):
        results = run_all()
    if json:
        typer.echo(jsonlib.dumps(results, indent=2))
        return
    for r in results:
        typer.echo(f"{r['name']}: KV cache {r['speedup']:.1f}x faster "
                   f"({r['kv_cache_tok_per_s']:.1f} vs {r['no_cache_tok_per_s']:.1f} tok/s, "
                   f"first {r['identical_prefix']} of {NEW_TOKENS} tokens identical with random "
                   f"weights, "
                   f"{r['threads']} threads)")
