"""The serving engine in-process: requests decoded together give each one the tokens it gets
alone, a cancelled sequence leaves the batch before the next step, and stop strings cut the
text as OpenAI's `stop` does."""

import contextlib
import queue
import threading

import pytest

from bitnet_cli.serve.engine import Engine, Job
from bitnet_cli.serve.stops import StopText
from bitnet_cli.use.loading import load_model
from tests.models import random_checkpoint, story_tokenizer

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    checkpoint = random_checkpoint(tmp_path_factory.mktemp("engine") / "run", "tinystories",
                                   story_tokenizer(), max_position_embeddings=256)
    return load_model(str(checkpoint))


@contextlib.contextmanager
def running(engine: Engine):
    """The engine's loop on a thread of its own for the block, stopped after it."""
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        yield engine
    finally:
        engine.stop()
        thread.join()


def decode(engine: Engine, jobs: list[Job]) -> list[list[tuple]]:
    """Submit every job at once; each job's events, in order, once all are done."""
    events = [[] for _ in jobs]
    done = queue.Queue()
    for index, job in enumerate(jobs):
        def deliver(event, index=index):
            events[index].append(event)
            if event[0] in ("done", "error"):
                done.put(index)
        job.deliver = deliver
    for job in jobs:
        assert engine.submit(job)
    for _ in jobs:
        done.get(timeout=120)
    return events


def tokens_of(events: list[tuple]) -> list[int]:
    return [token for event in events if event[0] == "text" for token, _, _ in event[2]]


def job(prompt, max_tokens, **options) -> Job:
    return Job(prompt=prompt, max_tokens=max_tokens, deliver=None, logprobs=0, **options)


@pytest.mark.parametrize("engine_name", ["2bit", "int8", "float"])
def test_sequences_decoded_together_get_what_they_get_alone(tmp_path, engine_name):
    checkpoint = random_checkpoint(tmp_path / "run", "tinystories", story_tokenizer(),
                                   max_position_embeddings=256)
    model = load_model(str(checkpoint), engine=engine_name)
    prompts = [[5, 6, 7], [9] * 20, [30, 31], list(range(40, 100)), [3]]
    # five requests, three streams: two wait their turn
    with running(Engine(model, max_streams=3)) as engine:
        alone = [tokens_of(decode(engine, [job(p, 24)])[0]) for p in prompts]
        together = decode(engine, [job(p, 24 - i) for i, p in enumerate(prompts)])
    for i, events in enumerate(together):
        assert tokens_of(events) == alone[i][:24 - i]  # a stop token ends both alike
        assert events[-1][0] == "done"
        assert events[-1][2].completion_tokens == len(tokens_of(events))


def test_a_cancelled_sequence_leaves_before_the_next_step(loaded):
    with running(Engine(loaded, max_streams=4)) as engine:
        long = job([5, 6, 7], 200)
        steady = job([8, 9], 60)
        events = []
        finished = threading.Event()

        def deliver(event):
            events.append(event)
            if event[0] == "text" and not long.cancelled.is_set():
                long.cancelled.set()  # the client left on its first piece of text
            if event[0] == "done":
                finished.set()
        long.deliver = deliver
        other = decode_in_background(engine, steady)
        assert engine.submit(long)
        assert finished.wait(120)
        assert [e[0] for e in events] == ["text", "done"]  # no token after the cancel
        assert events[-1][1] == "cancelled"
        assert events[-1][2].completion_tokens == len(tokens_of(events))
        assert tokens_of(other.get(timeout=120))  # the other went on


def decode_in_background(engine, one: Job) -> queue.Queue:
    result = queue.Queue()
    threading.Thread(target=lambda: result.put(decode(engine, [one])[0]), daemon=True).start()
    return result


def test_stop_ends_every_open_and_waiting_job_with_length(loaded):
    engine = Engine(loaded, max_streams=1)
    jobs = [job([5, 6], 250), job([7, 8], 250)]
    events = [[], []]
    for index, one in enumerate(jobs):
        one.deliver = events[index].append
        engine.submit(one)
    engine.stop()
    engine.run()  # the loop sees the stop before any step
    assert [e[-1][:2] for e in events] == [("done", "length"), ("done", "length")]
    assert not engine.submit(job([1], 1))  # a stopped engine takes nothing more


def test_prompt_scores_and_max_tokens_0(loaded):
    with running(Engine(loaded, max_streams=2)) as engine:
        events = decode(engine, [Job(prompt=[5, 6, 7, 8], max_tokens=0, deliver=None,
                                     prompt_logprobs=True, logprobs=2)])[0]
    kinds = [e[0] for e in events]
    assert kinds == ["prompt", "done"]
    scores = events[0][1]
    assert len(scores) == 4 and scores[0] == (None, None)
    # two tokens may read the same (a partial UTF-8 character): OpenAI keys them by text too
    assert all(logprob <= 0 and 1 <= len(top) <= 2 for logprob, top in scores[1:])


class Pieces:
    """Stands in for IncrementalText: each token is the text it is given."""

    def __init__(self, texts):
        self.texts = texts

    def add(self, token):
        return self.texts[token]

    def rest(self):
        return ""


def test_stop_text_holds_back_what_could_begin_a_stop_string():
    pieces = ["Hel", "lo E", "N", "D the", " rest"]
    text = StopText(Pieces(pieces), ("END",))
    out = [text.add(i) for i in range(3)]
    assert out == [("Hel", False), ("lo ", False), ("", False)]  # "E", "EN" held back
    assert text.add(3) == ("", True)  # "END" reached: nothing of it is given out
    assert text.rest() == ""


def test_stop_text_gives_back_a_held_prefix_that_was_not_a_stop():
    text = StopText(Pieces(["ab", "c", "x"]), ("cd", "zz"))
    assert text.add(0) == ("ab", False)
    assert text.add(1) == ("", False)
    assert text.add(2) == ("cx", False)
    assert StopText(Pieces(["c"]), ("cd",)).add(0) == ("", False)
    held = StopText(Pieces(["c"]), ("cd",))
    held.add(0)
    assert held.rest() == "c"  # the reply ended: what was held is text after all
