"""`bitnet serve` in a real process for tests: started on a free port (port 0; the line it
prints says which), its stderr read line by line as it comes, stopped by a signal."""

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

from bitnet_cli.bench.serve_processes import READY_BITNET

START_S = 180  # a cold first build of the 2-bit kernel takes about a minute on 2 cores


class ServerProcess:
    def __init__(self, home, model: str, *options: str, env: dict | None = None):
        self.lines: list[str] = []
        self.new_lines: queue.Queue = queue.Queue()
        environment = {**os.environ, "BITNET_HOME": str(home), **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bitnet_cli", "serve", model, "--port", "0", *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment)
        threading.Thread(target=self._read, daemon=True).start()
        match = self.wait_for(READY_BITNET, START_S)
        self.name, self.url = match.group(1), match.group(3)

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            self.new_lines.put(line.rstrip("\n"))
        self.new_lines.put(None)  # the process has closed stderr

    def wait_for(self, pattern, timeout: float) -> re.Match:
        """The first line from now on matching `pattern`, within `timeout` seconds."""
        pattern = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern.pattern!r} in {timeout} s:\n"
                                     + "\n".join(self.lines))
            try:
                line = self.new_lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the server exited ({self.process.wait()}) before a line "
                                     f"matching {pattern.pattern!r}:\n" + "\n".join(self.lines))
            if match := pattern.search(line):
                return match

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def call(url: str, method: str, path: str, body=None, headers: dict | None = None,
         timeout: float = 60):
    """(status, parsed JSON or text) of one request; `body` a dict (sent as JSON) or bytes."""
    connection = connect(url, timeout)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    connection.request(method, path, body=data,
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def past_a_step(url: str) -> None:
    """Return once the engine has dropped every sequence cancelled before this call: two
    one-token requests, one after the other. The second is admitted only after the engine's loop
    has passed, at least once since the first was sent, the point where cancelled sequences
    leave the batch (engine.run: admit, then drop the cancelled, then decode)."""
    for _ in range(2):
        status, reply = call(url, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 1})
        assert status == 200, reply


def connect(url: str, timeout: float = 60) -> http.client.HTTPConnection:
    where = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)


def open_stream(url: str, body: dict, path: str = "/v1/completions"):
    """A streamed request left open: (connection, the response's lines as they come)."""
    connection = connect(url)
    connection.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    lines = (line.decode().rstrip("\n") for line in iter(response.readline, b""))
    return connection, lines
