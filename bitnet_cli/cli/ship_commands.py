"""`bitnet import`, `bitnet export`, `bitnet bench`: bring a released model in, take a model to
other runtimes, and measure it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bitnet_cli.cli.app import MODEL_HELP, app, complete_run, flag, friendly, stoppable
from bitnet_cli.errors import BitnetError


# A stop signal or Ctrl-C during an import or export: the half-written folder was removed.
NOTHING_LEFT = "nothing half-written was left behind"


@app.command("import", rich_help_panel="Shipping")
@friendly
def import_(
    source: str = typer.Argument(..., help="A model folder, or a Hugging Face hub id "
                                           "(owner/name) to download.", show_default=False),
    name: Optional[str] = typer.Option(None, help="Run id (default: the source's name)."),
) -> None:
    """Bring in a released BitNet model, or a full-precision Llama, as a run: chat, eval,
    export and status take it.

    Reads transformers' BitNetForCausalLM (BitNet b1.58 2B4T: 2-bit packed codes with
    weight_scale, or its -bf16 master weights; bitnet's own hf and hf-packed exports),
    1bitLLM's BitnetForCausalLM (bitnet_b1_58-large, -3B) and LlamaForCausalLM (Llama 2
    and 3, TinyLlama, SmolLM: a --quant none run, the float engine computes it), from
    safetensors only: a pickle (.bin) checkpoint is refused, never loaded. The
    tokenizer.json comes along, and a reply stops at the source's end-of-sequence tokens.

    The run keeps the model at its 2-bit size: each ternary layer as packed codes
    and one scale (the release's layout, in the README), the rest in the source's
    dtype; chat, eval and export read the codes as they are, and train --from makes
    latent weights of them. What bitnet does not compute (RoPE scaled other than Llama
    3's, use_rms_norm, biases, ...) is refused in one line. Nothing is written unless
    every check passes:

      bitnet import microsoft/bitnet-b1.58-2B-4T
      bitnet chat bitnet-b1.58-2B-4T
    """
    import sys

    from bitnet_cli.use.importing import import_model

    with stoppable(NOTHING_LEFT):
        run = import_model(source, name, argv=sys.argv[1:])
    typer.echo(f"imported {source} as run {run.name} ({run}); talk to it with: "
               f"bitnet chat {run.name}")


@app.command(rich_help_panel="Shipping")
@friendly
def export(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False,
                                autocompletion=complete_run),
    format: str = typer.Option(..., "--format", help="hf, hf-packed or gguf."),
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist or be empty)."),
) -> None:
    """Export a model for transformers (latent or 2-bit packed weights) or llama.cpp (GGUF).

    hf: config.json, model.safetensors (latent fp32 weights) and the
    tokenizer; AutoModelForCausalLM.from_pretrained(OUT) loads it.

    hf-packed: the same, with the ternary weights packed 4 per byte as the
    released BitNet b1.58 2B4T checkpoint stores them.

    gguf: OUT/model.gguf for llama.cpp's bitnet architecture, tokenizer inside.
    Every llama.cpp computes a model trained with --activation silu right; a relu2
    model (the default, as BitNet b1.58 2B4T) needs one that reads
    bitnet.hidden_activation (upstream from 2026 on; not llama-cpp-python 0.3.36 or
    bitnet.cpp, which compute silu), and a note on stderr says so.

    OUT is written whole or not at all, and never over existing files.
    """
    from bitnet_cli.use.export import export_model
    from bitnet_cli.use.gguf_writer import GGUF_FILE

    with stoppable(NOTHING_LEFT):
        written, notes = export_model(model, format, out)
    for note in notes:
        typer.echo(note, err=True)
    size = sum(f.stat().st_size for f in written.iterdir())
    how = (f'llama.cpp: llama-completion -m {written / GGUF_FILE} -no-cnv -p "..."'
           if format == "gguf" else
           f'transformers (pip install \'bitnet-cli[hf]\'): '
           f'AutoModelForCausalLM.from_pretrained("{written}")')
    typer.echo(f"wrote {written} ({format}, {size / 1e6:.1f} MB); load it with {how}")


@app.command(rich_help_panel="Shipping")
@friendly
def bench(json: bool = flag("--json", help="Print JSON on stdout."),
          device: str = typer.Option("cpu", help="cpu (every section) or cuda (the 95M training "
                                                 "step in bf16 autocast, with tokens/s and MFU)."),
          released: bool = flag("--2b4t", help="Also decode at the shape of the released BitNet "
                                               "b1.58 2B4T (2.4B parameters, built from random "
                                               "2-bit codes), with the float16 and the int8 "
                                               "head, beside llama.cpp: about 2 GB of memory "
                                               "and two minutes more."),
          serve: bool = flag("--serve", help="Also serve the 95M shape with `bitnet serve` and "
                                            "with llama-cpp-python's server on the same "
                                            "weights, and time 1, 4 and 8 concurrent streamed "
                                            "requests from the same clients: about two "
                                            "minutes more (the comparison needs "
                                            "llama-cpp-python with its server extra)."),
          only: Optional[str] = typer.Option(None, show_default=False, metavar="NAMES",
                                             help="Run just these sections, comma-separated "
                                                  "(machine, train_step, data, decode, size, "
                                                  "memory, kv_cache, 2b4t, serve): --only serve "
                                                  "measures serving alone."),
          ) -> None:
    """Measure speed and size side by side in one process.

    Ratios first, absolute numbers beside them. Random weights on the presets' shapes (tiny to 95M); about nine minutes on 2 cores,
    most of it compiling each shape's training step, so close other work first.

    training step: BitNet against its --quant none twin (forward, backward, AdamW), eager and
    compiled (torch.compile), and compiled against eager; with --device cuda the 95M step with
    tokens/s and MFU (FLOPs per token as `bitnet cost` counts them, over the GPU's bf16 peak).
    data: the CPU's time to make one batch, for every experiment and size.
    decode: tokens/s and ms/token with the KV cache, every engine (2bit, the CPU default, and
    int8, each with a float16 or int8 head, eager or compiled; the float engine in fp32 and bf16
    autocast) and llama.cpp on the same weights at 95M; the bytes of weights each token reads, the
    GB/s that makes and its share of the machine's read bandwidth (bitnet's own wide-load loop
    on every thread, over 1 GiB); where a token's time goes in the fused step (ternary sums,
    head, attention, the rest); the BitLinear layers alone at one token, in GB/s for each engine.
    size: the projection weights in fp32 (latent) against 2-bit packed (export --format hf-packed).
    memory: peak RSS of fresh processes decoding and training the 95M shape.
    kv cache: decoding with it against re-running the sequence for every token.
    serve (--serve): `bitnet serve` and llama-cpp-python's server (one request at a time) on the
    same 95M weights, each a process on a loopback port with the same context and threads, 1, 4
    and 8 concurrent streams of greedy /v1/completions requests from the same clients: tokens/s
    of all streams together, against one stream and against llama-cpp-python's; time to the
    first token (p50, p95); each stream's own tokens/s. The servers and their temporary folder
    are removed however the bench ends.
    """
    from bitnet_cli import ui
    from bitnet_cli.ui.bench_tables import bench_report
    from bitnet_cli.bench import SECTIONS, run_all
    from bitnet_cli.store.files import to_json
    from bitnet_cli.nn.devices import resolve_device

    if device not in ("cpu", "cuda"):
        raise BitnetError(f"--device must be cpu or cuda, not {device!r}")
    sections = None
    if only is not None:
        sections = {name.strip().replace("-", "_") for name in only.split(",") if name.strip()}
        unknown = sorted(sections - set(SECTIONS))
        if unknown or not sections:
            raise BitnetError(f"--only takes section names, comma-separated ({', '.join(SECTIONS)})"
                              f"{', not ' + ', '.join(unknown) if unknown else ''}")
        sections |= {name for name, asked in (("2b4t", released), ("serve", serve)) if asked}
    if device == "cuda" and (serve or sections):
        raise BitnetError("--serve and --only measure the CPU; leave out --device cuda")
    resolve_device(device)  # one line where there is no CUDA
    with stoppable("nothing it started or wrote is left"), \
            ui.stderr.status("measuring...") as status:
        results = run_all(lambda what: status.update(f"measuring: {what}..."), device, released,
                          serve, sections)
    if json:
        typer.echo(to_json(results))
    else:
        ui.stdout.print(bench_report(results))
