"""`bitnet serve`: a model behind an OpenAI-compatible HTTP API, with a chat page."""

from __future__ import annotations

import sys
import time
from typing import Optional

import typer

from bitnet_cli.cli.app import (ENGINE_HELP, MODEL_HELP, app, complete_run, friendly,
                                load_text_model)
from bitnet_cli.config.settings import DEVICE_HELP
from bitnet_cli.nn.cores import choose_wait_policy
from bitnet_cli.errors import BitnetError


@app.command(rich_help_panel="Using a model")
@friendly
def serve(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False,
                                autocompletion=complete_run),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but the loopback "
                                               "address needs --api-key."),
    port: int = typer.Option(8000, help="Port to listen on (0: a free one, named when it starts)."),
    api_key: Optional[str] = typer.Option(
        None, envvar="BITNET_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' on the API (also read from BITNET_API_KEY)."),
    max_streams: Optional[int] = typer.Option(
        None, show_default=False,
        help="Sequences decoded together; more requests wait their turn. Default: 4 per core, "
             "fewer where memory would not hold each one's KV cache at the whole context."),
    engine: Optional[str] = typer.Option(None, help=ENGINE_HELP, show_default=False),
    head: Optional[str] = typer.Option(None, show_default=False,
                                       help="The 2bit and int8 engines' output layer: float16 "
                                            "(default), float32 or int8, as for chat."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Serve a model over HTTP with OpenAI's API, for the apps and libraries that speak it.

    Routes: GET /v1/models, POST /v1/completions (prompt as text, token ids or a list of
    either; logprobs with echo scores the prompt, as lm-evaluation-harness asks), POST
    /v1/chat/completions (the messages through an imported chat model's template; other models
    read the messages' text in order, a problem solver the last one), streamed as server-sent
    events with "stream": true; GET /health; a chat page at /. With temperature 0 a reply is
    the text `bitnet chat --prompt` gives. Sampling fields a request leaves out take chat's
    defaults (an imported model's own, where it has them).

    Requests that arrive while others decode join the next decode step: up to --max-streams
    sequences share each pass over the weights, so eight streams cost far less than eight
    times one. One line per request goes to stderr: status, tokens, time to the first token,
    tok/s. Ctrl-C or SIGTERM ends open streams (finish_reason "length") and exits 0.

      bitnet serve latest
      curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "Once upon a time", "max_tokens": 40, "stream": true}'
    """
    choose_wait_policy(shared=True)  # before torch is imported (nn/cores.py)
    from bitnet_cli.serve.server import check_exposure
    if max_streams is not None and not 1 <= max_streams <= 256:
        raise BitnetError(f"--max-streams must be from 1 to 256, got {max_streams}")
    if not 0 <= port <= 65535:
        raise BitnetError(f"--port must be from 0 to 65535, got {port}")
    if api_key is not None and not api_key.strip():
        raise BitnetError("--api-key is empty; give a key, or leave the option out")
    check_exposure(host, api_key)  # before a model loads
    from bitnet_cli.serve.server import serve as run_server

    loaded = load_text_model(model, device, engine, head)
    run_server(loaded, host, port, api_key, max_streams, log=_log,
               notice=lambda line: typer.echo(line, err=True))


def _log(line: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    sys.stderr.flush()
