"""What the model reads for a request: a completion's prompt as the tokenizer encodes it (or the
token ids it already is), a chat's messages through the model's chat template where it has one,
and how many new tokens fit after it in the context."""

from __future__ import annotations

from bitnet_cli.errors import BitnetError
from bitnet_cli.serve.schema import MAX_PROMPTS, ApiError, ChatRequest, CompletionRequest
from bitnet_cli.use.conversation import unreadable_prompt


class Prompts:
    """Token ids for requests to one loaded model."""

    def __init__(self, loaded, task):
        self.tokenizer, self.task, self.template = loaded.tokenizer, task, loaded.chat
        self.context = loaded.config.max_position_embeddings
        self.vocab = loaded.config.vocab_size

    def completion(self, request: CompletionRequest) -> list[list[int]]:
        """Each prompt's ids: text as `bitnet chat --raw` would read it, ids as they are."""
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts in one request, got "
                                f"{len(prompt)}", "prompt")
        return [self._ids(item) for item in prompt]

    def _ids(self, item: str | list[int]) -> list[int]:
        if isinstance(item, str):
            ids = self.tokenizer.encode(item).ids
            if not ids:
                raise ApiError(400, f"prompt: {unreadable_prompt(item, self.tokenizer)}",
                               "prompt")
            return ids
        if not item:
            raise ApiError(400, "prompt: a list of token ids must not be empty", "prompt")
        bad = next((i for i in item if not 0 <= i < self.vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary "
                                f"(0 to {self.vocab - 1})", "prompt")
        return item

    def chat(self, request: ChatRequest) -> list[int]:
        """The conversation as `bitnet chat` reads it: through the chat template of an imported
        chat model; for a problem solver (arithmetic, simple), the last user message as the
        problem; for other text models, every message's text in order, continued as plain
        text (the way chat keeps a conversation's turns)."""
        messages = request.messages
        if not any(m.role == "user" for m in messages):
            raise ApiError(400, "messages must hold at least one user message", "messages")
        try:
            if self.template is not None:
                rendered = self.template.render([{"role": m.role, "content": m.text}
                                                 for m in messages])
                return self.tokenizer.encode(rendered, add_special_tokens=False).ids
            if hasattr(self.task, "chat_prompt"):
                last = next(m for m in reversed(messages) if m.role == "user").text
                return self._text(self.task.chat_prompt(last), last)
            ids = []
            for message in messages:
                if message.text:
                    ids += self.tokenizer.encode(message.text).ids
            if not ids:
                raise ApiError(400, "messages: " + unreadable_prompt(
                    "".join(m.text for m in messages), self.tokenizer), "messages")
            return ids
        except BitnetError as e:  # the template failed, or not a problem the model reads
            raise ApiError(400, f"messages: {e}", "messages") from None

    def _text(self, model_text: str, typed: str) -> list[int]:
        ids = self.tokenizer.encode(model_text).ids
        if not ids:
            raise ApiError(400, "messages: " + unreadable_prompt(typed, self.tokenizer),
                           "messages")
        return ids

    def room(self, prompt: list[int], max_tokens: int | None, default: int | None,
             param: str = "max_tokens", scoring: bool = False) -> int:
        """New tokens for this prompt: max_tokens (or `default`, or what the context leaves),
        refused where the prompt and they do not fit in the context. 0 only when `scoring`
        (echo with logprobs: the prompt's own log-probabilities are the answer)."""
        left = self.context - len(prompt)
        if max_tokens is None:
            if left < 1:
                raise self._too_long(prompt, param, "no room for a reply")
            return min(default or left, left)
        if not (max_tokens >= 1 or (scoring and max_tokens == 0)):
            raise ApiError(400, f"{param} must be at least 1, got {max_tokens}", param)
        if max_tokens > self.context:
            raise ApiError(400, f"{param} is {max_tokens}, more than this model's context of "
                                f"{self.context} tokens", param)
        if max_tokens > left:
            raise self._too_long(prompt, param, f"{param} {max_tokens}")
        return max_tokens

    def _too_long(self, prompt: list[int], param: str, wanted: str) -> ApiError:
        return ApiError(400, f"the prompt is {len(prompt)} tokens and {wanted}, but this "
                             f"model's context is {self.context} tokens; shorten the prompt "
                             "or ask for fewer tokens", param, code="context_length_exceeded")
