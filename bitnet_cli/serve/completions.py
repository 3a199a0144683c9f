"""The answers of /v1/completions and /v1/chat/completions: one JSON response, or a stream of
server-sent events exactly as OpenAI's clients read them (`data: {chunk}` each, the last chunk
of a choice with its finish_reason, `data: [DONE]`). A client that hangs up, streaming or not,
cancels its sequences: they leave the engine's batch at its next step."""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse, StreamingResponse

from bitnet_cli.serve.replies import Replies, chat_logprobs, completion_logprobs, sse
from bitnet_cli.serve.schema import ApiError

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Choice:
    """One choice's text and scored tokens as they arrive."""

    def __init__(self, echo: str = ""):
        self.text, self.scored = echo, []
        self.offset = 0  # of the next streamed token's text (the echo is streamed too)


async def completion_response(api, request, parsed, replies: Replies, echoes):
    decode = api.tokenizer.decode
    choices = [Choice(echo) for echo in echoes] if echoes else \
        [Choice() for _ in replies.jobs]

    def piece(index: int, event: tuple) -> tuple[str, list]:
        """The text and scored tokens an event adds to choice `index`."""
        if event[0] == "prompt":  # only asked for with echo: the prompt's text comes with it
            ids = replies.jobs[index].prompt
            return echoes[index], [(decode([i]), logprob, top)
                                   for i, (logprob, top) in zip(ids, event[1])]
        if event[0] == "text":
            return event[1], [(decode([i]), logprob, top) for i, logprob, top in event[2]]
        return "", []

    def chunk(index: int, text: str, scored: list, finish=None) -> dict:
        logprobs = None
        if parsed.logprobs is not None:
            logprobs = completion_logprobs(scored, choices[index].offset)
            choices[index].offset += sum(len(t) for t, _, _ in scored)
        return {"id": replies.id, "object": "text_completion", "created": replies.created,
                "model": api.served.name, "choices": [{"index": index, "text": text,
                                                       "logprobs": logprobs,
                                                       "finish_reason": finish}]}

    if parsed.stream:
        async def events():
            if echoes and parsed.logprobs is None:
                for index, echo in enumerate(echoes):
                    yield sse(chunk(index, echo, []))
            async for index, event in replies:
                text, scored = piece(index, event)
                if event[0] == "done":
                    yield sse(chunk(index, "", [], event[1]))
                elif text or scored:
                    yield sse(chunk(index, text, scored))
        return _stream(api, request, parsed, replies, events())

    def add(index: int, event: tuple) -> None:
        text, scored = piece(index, event)
        choice = choices[index]
        choice.text += text if event[0] != "prompt" else ""  # the echo is there already
        choice.scored += scored

    await _collect(request, replies, add)
    body = {"id": replies.id, "object": "text_completion", "created": replies.created,
            "model": api.served.name,
            "choices": [{"index": i, "text": c.text, "finish_reason": replies.finish[i],
                         "logprobs": completion_logprobs(c.scored, 0)
                         if parsed.logprobs is not None else None}
                        for i, c in enumerate(choices)],
            "usage": replies.usage()}
    api._log(request, 200, replies)
    return JSONResponse(body)


async def chat_response(api, request, parsed, replies: Replies):
    decode = api.tokenizer.decode
    whole = hasattr(api.served.task, "chat_reply")  # a problem solver's answer, formatted
    choice = Choice()

    def base(delta: dict, scored: list, finish=None) -> dict:
        logprobs = chat_logprobs(scored) if parsed.logprobs else None
        return {"id": replies.id, "object": "chat.completion.chunk", "created": replies.created,
                "model": api.served.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish}]}

    def scored_of(event) -> list:
        return [(decode([i]), logprob, top) for i, logprob, top in event[2]]

    if parsed.stream:
        async def events():
            yield sse(base({"role": "assistant", "content": ""}, []))
            async for _, event in replies:
                if event[0] == "text":
                    choice.text += event[1]
                    if not whole and (event[1] or event[2]):
                        yield sse(base({"content": event[1]}, scored_of(event)))
                elif event[0] == "done":
                    if whole:
                        yield sse(base({"content": api.served.task.chat_reply(choice.text)}, []))
                    yield sse(base({}, [], event[1]))
        return _stream(api, request, parsed, replies, events())

    def add(_, event: tuple) -> None:
        if event[0] == "text":
            choice.text += event[1]
            choice.scored += scored_of(event)

    await _collect(request, replies, add)
    text = api.served.task.chat_reply(choice.text) if whole else choice.text
    body = {"id": replies.id, "object": "chat.completion", "created": replies.created,
            "model": api.served.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": chat_logprobs(choice.scored) if parsed.logprobs else None,
                         "finish_reason": replies.finish[0]}],
            "usage": replies.usage()}
    api._log(request, 200, replies)
    return JSONResponse(body)


def _stream(api, request, parsed, replies: Replies, events):
    """The events as an SSE response, then the usage chunk if asked for and [DONE]. A model
    failure mid-stream ends it with OpenAI's error object as the last event."""
    async def body():
        watcher = asyncio.ensure_future(_hang_up(request, replies))
        ended = False
        try:
            async for event in events:
                yield event
            if parsed.stream_options is not None and parsed.stream_options.include_usage:
                yield sse({"id": replies.id, "object": _chunk_object(replies),
                           "created": replies.created, "model": api.served.name,
                           "choices": [], "usage": replies.usage()})
            yield sse("[DONE]")
            ended = True
            api._log(request, 200, replies)
        except ApiError as e:
            ended = True
            yield sse(e.body())
            api._log(request, e.status, replies, e.message)
        finally:
            watcher.cancel()
            replies.cancel()  # a client that hung up: its sequences leave the batch
            if not ended:
                api._log(request, 200, replies, "the client hung up")
    return StreamingResponse(body(), media_type="text/event-stream", headers=STREAM_HEADERS)


def _chunk_object(replies: Replies) -> str:
    return "chat.completion.chunk" if replies.id.startswith("chatcmpl") else "text_completion"


async def _hang_up(request, replies: Replies) -> None:
    """Cancel the replies when the client disconnects. Its body has been read, so the next
    message it can send is the disconnect (uvicorn says so at once; writing to the closed
    socket would not fail for a while)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    replies.cancel()


async def _collect(request, replies: Replies, add) -> None:
    """Every event of a non-streamed request, watching for the client hanging up meanwhile."""
    watcher = asyncio.ensure_future(_hang_up(request, replies))
    try:
        async for index, event in replies:
            add(index, event)
    finally:
        watcher.cancel()
