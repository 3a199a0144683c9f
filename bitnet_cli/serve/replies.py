"""A request's jobs as the web side sees them (Replies: the engine's events, in order, on the
event loop) and the OpenAI JSON they become: whole responses, or server-sent event chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from bitnet_cli.serve.engine import Engine, Job, Usage
from bitnet_cli.serve.schema import ApiError


class Replies:
    """The jobs of one request, submitted to the engine; `async for index, event in replies`
    reads their events until every job is done. `cancel()` (a client that left) takes them out
    of the batch at the engine's next step."""

    def __init__(self, engine: Engine, jobs: list[Job], kind: str):
        self.id = f"{kind}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.jobs, self.open = jobs, len(jobs)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finish = [None] * len(jobs)
        loop = asyncio.get_running_loop()
        for index, job in enumerate(jobs):
            job.deliver = self._deliverer(loop, index)
        for job in jobs:
            if not engine.submit(job):
                self.cancel()
                if engine.stopping:
                    raise ApiError(503, "the server is shutting down", kind="server_error")
                raise ApiError(429, "too many requests are waiting; try again shortly",
                               kind="rate_limit_error", code="queue_full")

    def _deliverer(self, loop, index: int):
        def deliver(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop has closed: nobody is left to read it
                pass
        return deliver

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, tuple]:
        if self.open == 0:
            raise StopAsyncIteration
        index, event = await self.queue.get()
        if event[0] == "done":
            self.open -= 1
            self.finish[index] = event[1]
        elif event[0] == "error":
            self.cancel()
            raise ApiError(500, f"the model failed: {event[1]}", kind="server_error")
        return index, event

    @property
    def usages(self) -> list[Usage]:
        """Each job's counts as the engine has them now (a job still waiting: its prompt)."""
        return [job.usage or Usage(prompt_tokens=len(job.prompt)) for job in self.jobs]

    def usage(self) -> dict:
        prompt = sum(u.prompt_tokens for u in self.usages)
        completion = sum(u.completion_tokens for u in self.usages)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


def completion_logprobs(scored: list[tuple], offset: int) -> dict:
    """OpenAI's completions `logprobs` of (token text, logprob, top) triples, text offsets
    counted from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for text, logprob, top in scored:
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(scored: list[tuple]) -> dict:
    """OpenAI's chat `logprobs`: one entry per new token, its top alternatives beside it."""
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**entry(text, logprob),
                         "top_logprobs": [entry(t, p) for t, p in (top or {}).items()]}
                        for text, logprob, top in scored]}


def sse(data: dict | str) -> str:
    """One server-sent event as OpenAI's clients read it."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"
