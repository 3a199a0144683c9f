"""The OpenAI request bodies `bitnet serve` reads, checked field by field: pydantic for the types
(strict: "5" is not a number, 1.5 is not a count), then the ranges this model allows. A bad
request is an ApiError: the status and OpenAI's error JSON, naming the field."""

from __future__ import annotations

import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from bitnet_cli.config.sampling import MIN_TEMPERATURE, TEMPERATURE_RULE
from bitnet_cli.config.settings import MAX_SEED

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one completions request


class ApiError(Exception):
    """A request the server cannot answer: `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (status, message, param,
                                                                      kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class Common(BaseModel):
    """What both endpoints take. Fields OpenAI has and bitnet does not use (user,
    presence_penalty, ...) are ignored, as most servers do."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = None
    logprobs: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def parse(kind: type[BaseModel], body) -> BaseModel:
    """The request, or ApiError 400 naming the first wrong field and what it should be."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        loc = [part for part in error["loc"] if not _is_type_name(part)]
        where = ".".join(str(part) for part in loc)
        if loc and loc[-1] in UNIONS and error["type"] != "missing":
            message = f"must be {UNIONS[loc[-1]]}"
        else:
            message = error["msg"][0].lower() + error["msg"][1:]
        raise ApiError(400, f"{where}: {message}" if where else message,
                       param=where or None) from None


# What a field that takes several shapes takes, said whole (pydantic would name one of them).
UNIONS = {"prompt": "a string, a list of strings, a list of token ids, or a list of lists of "
                    "token ids",
          "stop": "a string or a list of strings",
          "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}


def _is_type_name(part) -> bool:
    """pydantic names the union member it tried ("str", "list[int]") in an error's place."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool")
                                      or part.startswith(("list[", "function-")))


def check_sampling(request: Common, vocab: int) -> None:
    """Every sampling field within the range bitnet's sampling takes."""
    t = request.temperature
    if t is not None and not (t == 0 or MIN_TEMPERATURE <= t < math.inf):
        raise ApiError(400, f"temperature must be {TEMPERATURE_RULE}, got {t}", "temperature")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise ApiError(400, f"top_p must be above 0 and at most 1, got {request.top_p}", "top_p")
    if request.top_k is not None and not 1 <= request.top_k <= vocab:
        raise ApiError(400, f"top_k must be from 1 to {vocab} (the vocabulary), got "
                            f"{request.top_k}", "top_k")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise ApiError(400, f"seed must be from 0 to {MAX_SEED}, got {request.seed}", "seed")
    if request.n not in (None, 1):
        raise ApiError(400, f"n must be 1 (one choice per prompt), got {request.n}", "n")
    for stop in stops(request):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise ApiError(400, f"each stop string must have 1 to {MAX_STOP_CHARS} characters",
                           "stop")
    if len(stops(request)) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop strings, got {len(stops(request))}",
                       "stop")


def stops(request: Common) -> tuple[str, ...]:
    if request.stop is None:
        return ()
    return (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)


def check_logprobs(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"{param} must be from 0 to {MAX_LOGPROBS}, got {value}", param)
