"""A released chat model's prompt format: the Jinja chat_template of its tokenizer_config.json
(or chat_template.jinja), rendered as transformers' apply_chat_template renders it.

The template comes from a file on disk, so it runs in Jinja's immutable sandbox: it can format
text and nothing else. `bitnet import` checks that it compiles; a template that fails on the
conversation at hand is one line from chat, not a traceback.
"""

from __future__ import annotations

import json

from bitnet_cli.errors import BitnetError, first_line


class ChatTemplate:
    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        # The environment transformers renders chat templates in, so the same text comes out.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False,
                                                                      indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise BitnetError(f"the chat template does not compile ({first_line(e)})") from None
        self.source, self.bos_token, self.eos_token = template, bos_token, eos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError
        try:
            return self.template.render(messages=messages, bos_token=self.bos_token,
                                        eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt)
        except (TemplateError, TypeError, ValueError) as e:
            raise BitnetError(f"the model's chat template failed on this conversation "
                              f"({first_line(e)}); "
                              "chat with --raw to continue plain text instead") from None

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
    beside it), with its special tokens, or None."""
    template = jinja_file if jinja_file is not None else tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is None:
        return None
    if not isinstance(template, str):
        raise BitnetError("tokenizer_config.json: chat_template is not text")
    return ChatTemplate(template, _token(tokenizer_config.get("bos_token")),
                        _token(tokenizer_config.get("eos_token")))


def _token(value) -> str:
    """A special token as tokenizer_config.json writes it: the text, or {"content": text}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
