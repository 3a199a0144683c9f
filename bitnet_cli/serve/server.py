"""`bitnet serve`'s process: the model loaded, the engine thread started, uvicorn listening.

Safe by default: it listens on the loopback address; on any other it needs an API key. The
socket is bound here before uvicorn starts, so a port in use is one line, and port 0 takes a
free one (the line that says where it serves names it). SIGTERM or Ctrl-C stops the engine
first: every open stream ends with finish_reason "length" and its [DONE], uvicorn closes the
connections, and the process exits 0 within seconds (a second Ctrl-C forces it)."""

from __future__ import annotations

import ipaddress
import socket
from importlib import resources

import torch
import uvicorn

from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.devices import free_memory
from bitnet_cli.serve.routes import Served, create_app
from bitnet_cli.serve.engine import Engine
from bitnet_cli.serve.prompts import Prompts
from bitnet_cli.tasks import load_experiment
from bitnet_cli.use.conversation import default_temperature

API_KEY_ENV = "BITNET_API_KEY"
STREAMS_PER_CORE = 4  # the fused step's gain flattens past ~8 sequences on 2 cores
MOST_STREAMS = 64
GRACE_S = 5  # seconds uvicorn waits for connections after the engine has ended every stream


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise BitnetError(f"serving on {host} lets anyone who can reach it use the model: pass "
                          f"--api-key KEY (or set {API_KEY_ENV}), or keep the default --host "
                          "127.0.0.1")


def default_streams(loaded) -> int:
    """Sequences decoded together where --max-streams is not given: a few per core, no more
    than half the free memory holds at a whole context's KV cache each."""
    config = loaded.config
    per_stream = (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                  * config.max_position_embeddings * 4)
    cores = max(1, torch.get_num_threads())
    streams = min(STREAMS_PER_CORE * cores, MOST_STREAMS)
    free = free_memory(loaded.model.rope_cos.device)
    if free is not None:
        streams = min(streams, max(1, free // 2 // per_stream))
    return max(1, streams)


def served_name(loaded) -> str:
    """The model's id in the API: its run's name (a checkpoint outside a run: its folder's)."""
    checkpoint = loaded.checkpoint
    return checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" \
        else checkpoint.name


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=256)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BitnetError(f"cannot listen on {host}:{port} ({reason}); pick another --port or "
                          "--host") from None
    sock.set_inheritable(True)
    return sock


def serve(loaded, host: str, port: int, api_key: str | None, max_streams: int | None,
          log, notice) -> None:
    """Serve `loaded` until SIGTERM or Ctrl-C; `log` hears each request's line and `notice`
    the lines about the server itself."""
    check_exposure(host, api_key)
    task = load_experiment(loaded.experiment)
    streams = max_streams or default_streams(loaded)
    stored = getattr(loaded, "sampling", None) or {}
    defaults = {"temperature": default_temperature(task), **stored}
    page = resources.files("bitnet_cli.serve").joinpath("page.html").read_text()
    engine = Engine(loaded, streams, notice=notice)
    served = Served(name=served_name(loaded), prompts=Prompts(loaded, task), defaults=defaults,
                    task=task, api_key=api_key, page=page, log=log)
    sock = bind(host, port)
    where = sock.getsockname()
    shown = f"[{where[0]}]" if ":" in where[0] else where[0]
    config = uvicorn.Config(create_app(engine, served), log_level="warning", access_log=False,
                            lifespan="off", ws="none", timeout_graceful_shutdown=GRACE_S)
    server = _Server(config, engine)
    engine.start()
    notice(f"serving {served.name} ({loaded.engine} engine, up to {streams} streams at once) "
           f"at http://{shown}:{where[1]} (OpenAI API under /v1, chat page at /); Ctrl-C stops")
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        engine.join(GRACE_S)
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server, stopping the engine first when told to exit, and exiting 0 after a
    graceful stop (uvicorn raises the signal again once it has shut down)."""

    def __init__(self, config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.stop()
        super().handle_exit(sig, frame)
        if hasattr(self, "_captured_signals"):
            self._captured_signals.clear()
