"""`bitnet serve`'s process: the model loaded, uvicorn listening on a thread of its own, and the
engine decoding on the main thread, the one that loaded the model.

PyTorch's OpenMP gives each thread that starts parallel work a pool of its own: a model loaded
on one thread and decoded on another ran two pools on the same cores, and a 95M step took
4.2-4.8 ms instead of 1.7-2.2 (a helper's measurement). So all of the model's work stays on
one thread, and the web side, which never touches torch, runs beside it.

Safe by default: it listens on the loopback address; on any other it needs an API key. The
socket is bound here before uvicorn starts, so a port in use is one line, and port 0 takes a
free one (the line that says where it serves names it). SIGTERM or Ctrl-C stops the engine:
every open stream ends with finish_reason "length" and its [DONE], uvicorn closes the
connections, and the process exits 0 within seconds (a second Ctrl-C forces it)."""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
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
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    web = uvicorn.Server(config)  # in a thread of its own: it never installs signal handlers

    def listen() -> None:
        try:
            web.run(sockets=[sock])
        finally:
            engine.stop()  # the web side has ended (or failed to start): so does the engine
    thread = threading.Thread(target=listen, name="bitnet-web", daemon=True)
    handlers = {sig: signal.signal(sig, _stopper(engine, web)) for sig in STOP_SIGNALS}
    try:
        thread.start()
        notice(f"serving {served.name} ({loaded.engine} engine, up to {streams} streams at "
               f"once) at http://{shown}:{where[1]} (OpenAI API under /v1, chat page at /); "
               "Ctrl-C stops")
        engine.run()  # on this thread, which loaded the model: one OpenMP pool (see above)
        thread.join(2 * GRACE_S)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        sock.close()


def _stopper(engine: Engine, web):
    """The handler of SIGINT and SIGTERM: the engine ends every stream, uvicorn stops taking
    requests and closes the connections once they end; a second signal forces it."""
    def stop(sig, frame) -> None:
        if engine.stopping:
            web.force_exit = True
        engine.stop()
        web.should_exit = True
    return stop
