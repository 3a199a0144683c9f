"""The serving engine: one thread that owns the model and decodes every open request together.

Continuous batching: a request that arrives while others decode has its prompt read between two
decode steps, then joins the next one. A decode step reads each weight once for all the
sequences in it (DecodeStep.batch: the fused step takes several tokens, each with its own KV
cache and position), so eight sequences cost far less than eight steps. A sequence that
finishes or is cancelled leaves the batch before the next step; past `max_streams` open
sequences, requests wait in arrival order. HTTP handling never runs here: each job hands its
events to `deliver` (the web side's queue) and the thread goes on.

Each sequence's logits are those of the same request decoded alone (the fused batch equals the
lone step to the bit), so a greedy reply is the same text whoever else is being served.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from bitnet_cli.errors import typed_first_line
from bitnet_cli.nn.decoding import DecodeStep
from bitnet_cli.nn.model import KVCache, sample_next
from bitnet_cli.tasks import load_experiment
from bitnet_cli.use.conversation import IncrementalText
from bitnet_cli.use.loading import LoadedModel
from bitnet_cli.serve.stops import StopText


@dataclass
class Job:
    """One sequence to decode, as the web side asks for it."""
    prompt: list[int]
    max_tokens: int  # new tokens at most; 0 only with prompt_logprobs (the prompt scored alone)
    deliver: Callable[[tuple], None]  # called from the engine thread with each event
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stops: tuple[str, ...] = ()
    logprobs: int | None = None  # top alternatives per new token (0: only the chosen one's)
    prompt_logprobs: bool = False  # the prompt's own tokens scored (echo with logprobs)
    cancelled: threading.Event = field(default_factory=threading.Event)
    usage: "Usage | None" = None  # the engine's counts, from its prompt's pass on (read-only)


# Events a job's `deliver` receives, in order:
#   ("prompt", [(logprob | None, {token text: logprob}), ...])   only with prompt_logprobs
#   ("text", piece, [(token id, logprob, {text: logprob}) ...])  new text, the tokens behind it
#   ("done", finish_reason, Usage)                               always last, unless
#   ("error", message)                                           the model failed
# finish_reason: "stop" (a stop token or string), "length" (max_tokens, the context, or the
# server stopping), "cancelled" (the client left; nobody reads it).


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    queued_s: float = 0.0  # from submit to the prompt's pass
    first_token_s: float = 0.0  # from submit to the first new token
    decode_s: float = 0.0  # from the first new token to the last

    @property
    def tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


class Sequence:
    """A job being decoded: its cache, the last token (the next step's input), its text."""

    def __init__(self, job: Job, loaded: LoadedModel, stop_ids: tuple[int, ...], submitted: float):
        self.job, self.stop_ids, self.submitted = job, stop_ids, submitted
        self.cache = KVCache(loaded.config, device=loaded.model.rope_cos.device)
        self.text = StopText(IncrementalText(loaded.tokenizer), job.stops)
        self.usage = Usage(prompt_tokens=len(job.prompt))
        self.generator = None
        if job.temperature > 0:
            self.generator = torch.Generator(device=loaded.model.rope_cos.device)
            if job.seed is not None:
                self.generator.manual_seed(job.seed)
            else:
                self.generator.seed()
        self.last = -1
        self.first_at = 0.0
        self.tokens: list[tuple] = []  # (id, logprob, top) since the last text given out


class Engine:
    """`submit(job)` from any thread; `run()` is the loop of the one thread that decodes (the
    server's main thread); `stop()` ends every open job with finish reason "length" and the
    loop with them."""

    def __init__(self, loaded: LoadedModel, max_streams: int, max_waiting: int = 256,
                 notice=lambda line: None):
        self.loaded, self.max_streams, self.max_waiting = loaded, max_streams, max_waiting
        model = loaded.model
        self.step = DecodeStep(model, compile=False, notice=notice)
        self.context = loaded.config.max_position_embeddings
        self.tokenizer = loaded.tokenizer
        # An imported model's end-of-sequence ids, else the experiment's (as chat stops).
        self.stop_ids = loaded.stop_ids or tuple(
            load_experiment(loaded.experiment).stop_ids(loaded.tokenizer))
        self.waiting: collections.deque = collections.deque()
        self.active: list[Sequence] = []
        self.lock = threading.Condition()
        self.stopping = False

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the web side answers 429)."""
        with self.lock:
            if self.stopping or len(self.waiting) >= self.max_waiting:
                return False
            self.waiting.append((job, time.perf_counter()))
            self.lock.notify()
        return True

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(open sequences, waiting requests)."""
        return len(self.active), len(self.waiting)

    def run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.lock:
                    while not (self.waiting or self.active or self.stopping):
                        self.lock.wait()
                    if self.stopping:
                        break
                    room = self.max_streams - len(self.active)
                    admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                for job, submitted in admitted:
                    self._guarded(lambda: self._admit(job, submitted), [job])
                self._leave_cancelled()
                if self.active:
                    self._guarded(self._decode, [s.job for s in self.active])
        self._end_all()

    def _guarded(self, work, jobs: list[Job]) -> None:
        """Run `work`; if the model fails, its jobs end with the error (the web side answers
        500 with it) and the engine goes on with the others."""
        try:
            work()
        except Exception as e:  # a fault of the model or the engine, not of one request
            message = typed_first_line(e)
            for job in jobs:
                job.deliver(("error", message))
            self.active = [s for s in self.active if s.job not in jobs]

    def _end_all(self) -> None:
        with self.lock:
            left = [job for job, _ in self.waiting]
            self.waiting.clear()
        for sequence in self.active:
            self._finish(sequence, "length")
        self.active = []
        for job in left:
            job.deliver(("done", "length", Usage(prompt_tokens=len(job.prompt))))

    def _leave_cancelled(self) -> None:
        kept = []
        for sequence in self.active:
            if sequence.job.cancelled.is_set():
                self._finish(sequence, "cancelled")
            else:
                kept.append(sequence)
        self.active = kept

    def _admit(self, job: Job, submitted: float) -> None:
        """The prompt's pass: its cache filled, the first new token chosen (or, for a job that
        only scores its prompt, its log-probabilities given and the job done)."""
        if job.cancelled.is_set():
            job.deliver(("done", "cancelled", Usage(prompt_tokens=len(job.prompt))))
            return
        sequence = Sequence(job, self.loaded, self.stop_ids, submitted)
        job.usage = sequence.usage
        sequence.usage.queued_s = time.perf_counter() - submitted
        ids = torch.tensor([job.prompt], device=self.loaded.model.rope_cos.device)
        logits = self.loaded.model(ids, sequence.cache, last_only=not job.prompt_logprobs)[0]
        if job.prompt_logprobs:
            job.deliver(("prompt", self._prompt_scores(job.prompt, logits, job.logprobs or 0)))
        if job.max_tokens == 0:
            self._finish(sequence, "length")
            return
        self.active.append(sequence)
        self._take(sequence, logits[-1])

    def _decode(self) -> None:
        """One step for every open sequence, each given its next token."""
        tokens = [sequence.last for sequence in self.active]
        logits = self.step.batch(tokens, [sequence.cache for sequence in self.active])
        for sequence, row in zip(list(self.active), logits):
            self._take(sequence, row)

    def _take(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Choose the sequence's next token from its logits and hand on what it adds; finish the
        sequence at a stop token, a stop string, max_tokens or the end of the context."""
        job = sequence.job
        token = sample_next(logits, job.temperature, job.top_k, job.top_p, sequence.generator)
        now = time.perf_counter()
        usage = sequence.usage
        if usage.completion_tokens == 0:
            usage.first_token_s, sequence.first_at = now - sequence.submitted, now
        usage.completion_tokens += 1
        usage.decode_s = now - sequence.first_at
        sequence.last = token
        if job.logprobs is not None:
            sequence.tokens.append((token, *self._scores(logits, token, job.logprobs)))
        if token in sequence.stop_ids:
            self._finish(sequence, "stop")
            return
        piece, stopped = sequence.text.add(token)
        if piece or stopped:
            job.deliver(("text", piece, sequence.tokens))
            sequence.tokens = []
        if stopped:
            self._finish(sequence, "stop")
        elif (usage.completion_tokens >= job.max_tokens
              or usage.prompt_tokens + usage.completion_tokens >= self.context):
            self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        job = sequence.job
        if reason != "cancelled":
            rest = sequence.text.rest()
            if rest or sequence.tokens:
                job.deliver(("text", rest, sequence.tokens))
        sequence.tokens = []
        job.deliver(("done", reason, sequence.usage))
        if sequence in self.active:
            self.active.remove(sequence)

    def _scores(self, logits: torch.Tensor, token: int, top: int) -> tuple[float, dict]:
        """The token's log-probability under the model, and the `top` most likely tokens'."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return float(logprobs[token]), self._top(logprobs, top)

    def _top(self, logprobs: torch.Tensor, top: int) -> dict:
        if top <= 0:
            return {}
        values, ids = logprobs.topk(top)
        return {self.tokenizer.decode([int(i)]): float(v) for v, i in zip(values, ids)}

    def _prompt_scores(self, prompt: list[int], logits: torch.Tensor, top: int) -> list[tuple]:
        """Each prompt token's log-probability given the ones before it (None for the first),
        with the `top` most likely tokens at its place (loglikelihood scoring reads the first:
        whether the prompt's own token was the greedy one)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scores = [(None, None)]
        for position, token in enumerate(prompt[1:]):
            row = logprobs[position]
            scores.append((float(row[token]), self._top(row, top)))
        return scores
