"""The clients of `bitnet bench --serve`: one streamed /v1/completions request read as OpenAI's
clients read server-sent events, timed (sent, first text, last text, end), and several streams
of them at once, each a thread sending its requests one after another. The same code drives
both servers; the load test (tests/test_serve_load.py) reads replies with it too."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse

PROMPTS = [  # taken in turn; about 30 tokens each
    "Once upon a time there was a little robot who wanted to see the sea.",
    "The old lighthouse keeper climbed the stairs every night with a lamp.",
    "In the middle of the forest stood a house made entirely of glass.",
    "Tom found a map under his bed, and the map was drawn in gold ink.",
    "The baker woke before the sun and started the ovens, as always.",
    "A small cat sat on the wall and watched the rain fall on the garden.",
    "When the train stopped in the snow, the passengers began to talk.",
    "Every summer the children built a raft and sailed it down the river.",
]


def request_body(prompt: str, max_tokens: int) -> dict:
    """One greedy completion request, the same for both servers: each reads the fields it
    knows (llama-cpp-python: repeat_penalty 1, so greedy is plain greedy; bitnet:
    stream_options, so the stream ends with its token count)."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "repeat_penalty": 1.0}


def connect(url: str, timeout: float) -> http.client.HTTPConnection:
    where = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)


def stream_completion(url: str, body: dict, timeout: float = 600) -> dict:
    """One streamed POST /v1/completions, read as OpenAI's clients read server-sent events, with
    the times it was sent, its first text came, its last text came and it ended: the text, the
    finish reason, whether [DONE] ended it, the status (in `error`: an error's body, an event
    after [DONE], a chunk after the finish reason), and the new tokens: the usage's count where
    the stream reports it, else max_tokens where the finish reason is "length", else one per
    chunk with text (a token that ends inside a character comes with the next one)."""
    max_tokens = body.get("max_tokens")
    record = {"sent": time.perf_counter(), "status": None, "text": "", "chunks": 0,
              "tokens": 0, "first": None, "last": None, "end": None, "finish": None,
              "done": False, "error": None}
    connection = connect(url, timeout)
    pieces = []
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        record["status"] = response.status
        if response.status != 200:
            record["error"] = response.read().decode(errors="replace")[:500]
            return record
        usage = None
        for raw in iter(response.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            if not line.startswith("data:"):
                continue  # blank lines between events, comments (": ping")
            data = line[5:].strip()
            if record["done"]:
                record["error"] = f"an event after [DONE]: {data[:200]}"
            if data == "[DONE]":
                record["done"] = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                record["error"] = json.dumps(chunk["error"])[:500]
            now = time.perf_counter()
            for choice in chunk.get("choices") or []:
                if record["finish"] and (choice.get("text") or choice.get("finish_reason")):
                    record["error"] = f"a chunk after the finish_reason: {data[:200]}"
                if choice.get("text"):
                    pieces.append(choice["text"])
                    record["chunks"] += 1
                    record["first"] = record["first"] or now
                    record["last"] = now
                if choice.get("finish_reason"):
                    record["finish"] = choice["finish_reason"]
            usage = chunk.get("usage") or usage
        record["tokens"] = (usage["completion_tokens"] if usage else max_tokens
                            if record["finish"] == "length" else record["chunks"])
    except Exception as e:  # noqa: BLE001  the connection, the HTTP or the JSON: a failed request
        record["error"] = f"{type(e).__name__}: {e}"
    finally:
        record["end"] = time.perf_counter()
        record["text"] = "".join(pieces)
        connection.close()
    return record


def drive(url: str, streams: int, requests_per_stream: int, max_tokens: int) -> list[dict]:
    """`streams` clients at once, each sending its requests one after another (stream s's
    request k has prompt s * requests_per_stream + k of PROMPTS, in turn); every request's
    record, its stream's number in `stream`."""
    records: list[dict] = []
    barrier = threading.Barrier(streams)

    def client(stream: int) -> None:
        barrier.wait()
        for k in range(requests_per_stream):
            prompt = PROMPTS[(stream * requests_per_stream + k) % len(PROMPTS)]
            records.append({**stream_completion(url, request_body(prompt, max_tokens)),
                            "stream": stream})
    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records
