"""The OpenAI-compatible web API of `bitnet serve` (Starlette): /v1/models, /v1/completions,
/v1/chat/completions, /health, and the chat page at /.

Handlers only check requests, hand jobs to the engine thread and turn its events into JSON or
server-sent events; they never run the model. Every bad request is a 4xx with OpenAI's error
JSON, and the server goes on. Each request ends with one log line."""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from bitnet_cli.errors import typed_first_line
from bitnet_cli.serve.engine import Engine, Job
from bitnet_cli.serve.prompts import Prompts
from bitnet_cli.serve.completions import chat_response, completion_response
from bitnet_cli.serve.replies import Replies
from bitnet_cli.serve.schema import (ApiError, ChatRequest, CompletionRequest, check_logprobs,
                                     check_sampling, parse, stops)

MAX_BODY = 4 * 2**20  # bytes: a whole context of token ids fits many times over
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# The chat page may talk to this server and nothing else (its own tag says the same).
PAGE_POLICY = ("default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; "
               "style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'")


@dataclass
class Served:
    """What the API says about the model it serves, and how it reads requests for it."""
    name: str
    prompts: Prompts
    defaults: dict  # temperature, top_k, top_p where a request leaves them out
    task: object  # the experiment: a problem solver formats its chat answers (chat_reply)
    api_key: str | None = None
    page: str = ""
    log: Callable[[str], None] = print
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, served: Served) -> Starlette:
    api = Api(engine, served)
    routes = [Route("/", api.page), Route("/health", api.health),
              Route("/v1/models", api.models), Route("/v1/models/{name:path}", api.model),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"])]
    handlers = {ApiError: api.error, HTTPException: api.http_error, Exception: api.crash}
    return Starlette(routes=routes, exception_handlers=handlers)


class Api:
    def __init__(self, engine: Engine, served: Served):
        self.engine, self.served = engine, served
        self.tokenizer = served.prompts.tokenizer

    # --- small routes ---
    async def page(self, request: Request):
        return HTMLResponse(self.served.page, headers={"Content-Security-Policy": PAGE_POLICY})

    async def health(self, request: Request):
        streams, waiting = self.engine.load
        return JSONResponse({"status": "ok", "streams": streams, "waiting": waiting})

    def _model_card(self) -> dict:
        context = self.served.prompts.context
        return {"id": self.served.name, "object": "model", "created": self.served.created,
                "owned_by": "bitnet", "context_length": context, "max_model_len": context}

    async def models(self, request: Request):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request):
        self._authorize(request)
        self._check_model(request.path_params["name"])
        return JSONResponse(self._model_card())

    # --- errors ---
    async def error(self, request: Request, e: ApiError):
        self._log(request, e.status, note=e.message)
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(self, request: Request, e: HTTPException):
        messages = {404: f"no route {request.url.path}; the API is under /v1",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        return await self.error(request, ApiError(e.status_code, messages.get(
            e.status_code, str(e.detail))))

    async def crash(self, request: Request, e: Exception):
        return await self.error(request, ApiError(500, f"internal error: {typed_first_line(e)}",
                                                  kind="server_error"))

    def _authorize(self, request: Request) -> None:
        key = self.served.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  key.encode()):
            raise ApiError(401, "a valid API key is needed: send the header "
                                "'Authorization: Bearer <key>'", kind="invalid_request_error",
                           code="invalid_api_key")

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.served.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.served.name!r}", "model", code="model_not_found")

    async def _body(self, request: Request) -> dict:
        """The JSON body, read up to MAX_BODY bytes."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            raise self._too_big()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise self._too_big()
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:
            reason = str(e).splitlines()[0] if isinstance(e, ValueError) else "nested too deep"
            raise ApiError(400, f"the request body is not valid JSON ({reason})") from None

    @staticmethod
    def _too_big() -> ApiError:
        return ApiError(413, f"the request body is over {MAX_BODY // 2**20} MiB")

    def _parsed(self, kind, body: dict):
        parsed = parse(kind, body)
        self._check_model(parsed.model)
        check_sampling(parsed, self.served.prompts.vocab)
        return parsed

    def _job(self, prompt: list[int], parsed, max_tokens: int, **extra) -> Job:
        defaults = self.served.defaults
        pick = lambda name: (getattr(parsed, name) if getattr(parsed, name) is not None
                             else defaults.get(name))
        return Job(prompt=prompt, max_tokens=max_tokens, deliver=None,
                   temperature=pick("temperature") or 0.0, top_k=pick("top_k"),
                   top_p=pick("top_p"), seed=parsed.seed, stops=stops(parsed), **extra)

    def _log(self, request: Request, status: int, replies: Replies | None = None,
             note: str = "") -> None:
        """One line: the route and status, then the tokens, time to the first token, tok/s
        and finish reasons of what was generated, and a note."""
        parts = []
        if replies is not None:
            usage = replies.usage()
            parts.append(f"{usage['prompt_tokens']}+{usage['completion_tokens']} tokens")
            first = [u.first_token_s for u in replies.usages if u.completion_tokens]
            if first:
                parts.append(f"first token {1e3 * min(first):,.0f} ms")
            rates = [u.tokens_per_s for u in replies.usages if u.tokens_per_s]
            if rates:
                parts.append(f"{sum(rates) / len(rates):,.1f} tok/s")
            parts.append(",".join(f or "cancelled" for f in replies.finish))
        if note:
            parts.append(note)
        self.served.log(f"{request.method} {request.url.path} {status} {', '.join(parts)}"
                        .rstrip())

    # --- the two generating routes ---
    async def completions(self, request: Request):
        self._authorize(request)
        parsed = self._parsed(CompletionRequest, await self._body(request))
        check_logprobs(parsed.logprobs, "logprobs")
        prompts = self.served.prompts.completion(parsed)
        scoring = bool(parsed.echo) and parsed.logprobs is not None
        jobs = [self._job(ids, parsed, self.served.prompts.room(
                    ids, parsed.max_tokens, COMPLETION_DEFAULT_TOKENS, scoring=scoring),
                    logprobs=parsed.logprobs, prompt_logprobs=scoring) for ids in prompts]
        replies = Replies(self.engine, jobs, "cmpl")
        echoes = [self.tokenizer.decode(ids) if not isinstance(p, str) else p for ids, p in
                  zip(prompts, _as_list(parsed.prompt))] if parsed.echo else None
        return await completion_response(self, request, parsed, replies, echoes)

    async def chat(self, request: Request):
        self._authorize(request)
        parsed = self._parsed(ChatRequest, await self._body(request))
        check_logprobs(parsed.top_logprobs, "top_logprobs")
        limit, param = ((parsed.max_completion_tokens, "max_completion_tokens")
                        if parsed.max_completion_tokens is not None else
                        (parsed.max_tokens, "max_tokens"))
        prompt = self.served.prompts.chat(parsed)
        top = (parsed.top_logprobs or 0) if parsed.logprobs else None
        job = self._job(prompt, parsed, self.served.prompts.room(prompt, limit, None, param),
                        logprobs=top)
        replies = Replies(self.engine, [job], "chatcmpl")
        return await chat_response(self, request, parsed, replies)


def _as_list(prompt) -> list:
    return [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) \
        else prompt
