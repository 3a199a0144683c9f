"""A released chat model's prompt format: the Jinja chat_template of its tokenizer_config.json
(or chat_template.jinja), rendered as transformers' apply_chat_template renders it.

The template comes from a file on disk, so it runs in Jinja's immutable sandbox: it can format
text and nothing else. The sandbox alone still lets a template loop for hours, recurse, or
build a string of gigabytes, so every compile and render here is bounded too: ranges (the
sandbox's 100,000), the template lines run and the time, the size of what `*`, `+` and `**`
make, the output's length, and on Linux the memory a render may add. `bitnet import` renders
it once on a sample conversation; a template that fails on the conversation at hand is one
line from chat, not a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from contextlib import contextmanager

from bitnet_cli.errors import BitnetError, first_line

MAX_TEMPLATE = 200_000  # characters; released templates, tools and all, are under 20,000
MAX_LINES = 1_000_000  # template lines one render runs; a real one runs a few per message
MAX_SECONDS = 5.0  # and its time, for what runs between lines; a real one takes milliseconds
MAX_TEXT = 1_000_000  # characters a render (or a string in it) holds past twice its messages
MAX_BITS = 100_000  # an integer's size in a template: far past any count
MEMORY_HEADROOM = 1 << 29  # bytes a compile or render may add (Linux's RLIMIT_AS)
SAMPLE = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Hello, who are you?"},
          {"role": "assistant", "content": "I am a language model."},
          {"role": "user", "content": "Tell me a short story about a cat."}]


class TemplateLimit(Exception):
    """A render stopped at one of the bounds above."""


class ChatTemplate:
    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError

        def raise_exception(message):
            raise TemplateError(message)

        if len(template) > MAX_TEMPLATE:
            raise BitnetError(f"the chat template is {len(template):,} characters; bitnet reads "
                              f"templates of up to {MAX_TEMPLATE:,}")
        # The environment transformers renders chat templates in, so the same text comes out.
        env = _environment_class()(trim_blocks=True, lstrip_blocks=True,
                                   extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False,
                                                                      indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            with _memory_cap():  # Jinja folds constant expressions while it compiles
                self.template = env.from_string(template)
        except Exception as e:  # a syntax error, or a constant that fails while folded
            raise BitnetError(f"the chat template does not compile ({_why(e)})") from None
        self.source, self.bos_token, self.eos_token = template, bos_token, eos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            text = self._render(messages, add_generation_prompt)
        except Exception as e:  # whatever the template's code raised, or a bound it ran into
            raise BitnetError(f"the model's chat template failed on this conversation "
                              f"({_why(e)}); "
                              "chat with --raw to continue plain text instead") from None
        if not text:  # no prompt to continue: the model would have nothing to read
            raise BitnetError("the model's chat template made an empty prompt of this "
                              "conversation; chat with --raw to continue plain text instead")
        return text

    def check(self) -> None:
        """The template made ready for chat, or one line: it must render a plain conversation
        (with a system turn, or without one, which some templates refuse) and keep the user's
        last turn in the prompt."""
        from jinja2 import TemplateError
        failure = None
        for messages in (SAMPLE, SAMPLE[1:]):
            try:
                text = self._render(messages, True)
            except Exception as e:  # as in render; only the template's own refusal tries again
                failure = failure or e
                if isinstance(e, TemplateError):
                    continue
                break
            if messages[-1]["content"] not in text:
                raise BitnetError("the chat template leaves the user's turn out of the prompt "
                                  "it makes of a sample conversation, so chat could not use it")
            return
        raise BitnetError(f"the chat template fails on a sample conversation (system, user, "
                          f"assistant, user): {_why(failure)}")

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The template's text, streamed so that an endless output stops at its bound."""
        env = self.template.environment
        env.text_limit = limit = MAX_TEXT + 2 * sum(len(str(m.get("content", "")))
                                                    for m in messages)
        pieces, size = [], 0
        stream = self.template.generate(messages=messages, bos_token=self.bos_token,
                                        eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt)
        try:
            with _bounded():
                for piece in stream:
                    size += len(piece)
                    if size > limit:
                        raise TemplateLimit(f"its output passed {limit:,} characters")
                    pieces.append(piece)
        finally:
            stream.close()
        return "".join(pieces)

    def to_dict(self) -> dict[str, str]:
        return {"template": self.source, "bos_token": self.bos_token, "eos_token": self.eos_token}

    @classmethod
    def from_dict(cls, data, where: str) -> ChatTemplate | None:
        """The template stored with a model (trainer.json's "chat"), or None when there is none."""
        if data is None:
            return None
        if not (isinstance(data, dict) and all(isinstance(data.get(key, ""), str)
                                               for key in ("template", "bos_token", "eos_token"))
                and data.get("template")):
            raise BitnetError(f"{where}: chat must hold a template and its bos/eos tokens as "
                              "text; restore the file from the import's source")
        return cls(data["template"], data.get("bos_token", ""), data.get("eos_token", ""))


def source_template(tokenizer_config: dict, jinja_file: str | None) -> ChatTemplate | None:
    """The chat template a model folder declares (tokenizer_config.json, or chat_template.jinja
    beside it), with its special tokens, checked on a sample conversation, or None. An empty
    template is none, as transformers takes it (its models then have no chat format)."""
    template = jinja_file if jinja_file is not None else tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                   and isinstance(t.get("template"), str) for t in template):
            raise BitnetError("tokenizer_config.json: chat_template must be text, or a list of "
                              "{name, template} entries of text")
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is None or template == "":
        return None
    if not isinstance(template, str):
        raise BitnetError("tokenizer_config.json: chat_template is not text")
    chat = ChatTemplate(template, _token(tokenizer_config.get("bos_token")),
                        _token(tokenizer_config.get("eos_token")))
    chat.check()
    return chat


def _token(value) -> str:
    """A special token as tokenizer_config.json writes it: the text, or {"content": text}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _why(error: BaseException) -> str:
    if isinstance(error, MemoryError):
        return f"it needs more than {MEMORY_HEADROOM >> 20} MB of memory"
    if isinstance(error, RecursionError):
        return "it nests or recurses too deeply"
    return first_line(error)


@functools.cache
def _environment_class():
    """The sandbox, its `*`, `+` and `**` checked before they run: a string repeated 10**10
    times, or a number with a billion digits, is refused instead of made."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})  # also kept from constant folding
        text_limit = MAX_TEXT

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right, self.text_limit)
            return super().call_binop(context, operator, left, right)
    return BoundedEnvironment


def _check_binop(operator: str, left, right, limit: int) -> None:
    sequences = (str, list, tuple)
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**":
        if ints and abs(left) > 1 and right * left.bit_length() > MAX_BITS:
            raise TemplateLimit(f"{left} ** {right} is too big a number")
    elif operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, sequences) and isinstance(times, int) and len(seq) * times > limit:
                raise TemplateLimit(f"a repeat {times:,} times would pass {limit:,} characters")
        if ints and left.bit_length() + right.bit_length() > MAX_BITS:
            raise TemplateLimit("a product too big a number")
    elif isinstance(left, sequences) and isinstance(right, sequences):
        if len(left) + len(right) > limit:
            raise TemplateLimit(f"a concatenation would pass {limit:,} characters")


class _Budget:
    """A trace function counting the lines a template's code runs, and checking the time."""

    def __init__(self):
        self.lines, self.deadline = MAX_LINES, time.monotonic() + MAX_SECONDS

    def enter(self, frame, event, arg):
        # Jinja compiles a template to Python whose file name is <template>: only it is counted.
        return self.line if frame.f_code.co_filename == "<template>" else None

    def line(self, frame, event, arg):
        if event == "line":
            self.lines -= 1
            if self.lines < 0:
                raise TemplateLimit(f"it ran past {MAX_LINES:,} steps")
            if self.lines % 64 == 0 and time.monotonic() > self.deadline:
                raise TemplateLimit(f"it ran past {MAX_SECONDS:.0f} s")
        return self.line


@contextmanager
def _bounded():
    """A render's bounds: steps and time through a trace function (the one before it, a
    debugger's or coverage's, is put back), and memory."""
    previous = sys.gettrace()
    with _memory_cap():
        sys.settrace(_Budget().enter)
        try:
            yield
        finally:
            sys.settrace(previous)


@contextmanager
def _memory_cap():
    """On Linux, at most MEMORY_HEADROOM more address space while the block runs, so that a
    template building a huge string gets a MemoryError instead of the machine's memory
    (elsewhere the other bounds alone hold). Only the rendering thread works meanwhile."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            cap = int(f.read().split()[0]) * resource.getpagesize() + MEMORY_HEADROOM
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        else:
            soft = None  # a tighter limit is set already: it stays
    except (ImportError, OSError, ValueError):
        soft = None
    try:
        yield
    finally:
        if soft is not None:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
