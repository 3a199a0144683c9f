"""`bitnet serve` through the clients people point at it: the official `openai` package, curl,
raw HTTP for every bad request, and signals; greedy text equal to `bitnet chat --prompt`."""

import json
import signal
import socket
import subprocess

import pytest

from bitnet_cli.data.shards import EOT
from tests.cli import invoke, optional
from tests.models import random_checkpoint, story_tokenizer
from tests.serving import ServerProcess, call, open_stream, past_a_step

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(short_run):
    run = short_run("tinystories")
    with ServerProcess(run.parent.parent, "tinystories") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    openai = optional("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat_says(run, prompt: str, tokens: int) -> str:
    """What `bitnet chat --prompt` prints for the prompt, greedy."""
    from tests.cli import home_at
    with home_at(run.parent.parent):
        out = invoke("chat", "tinystories", "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", tokens).stdout
    return out[:-1]  # chat ends its reply with a newline


def test_models_lists_the_run_with_its_context(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tinystories"]
    assert models[0].model_extra["context_length"] == 64


def test_greedy_completion_equals_chat_streamed_or_not(client, server, short_run):
    expected = chat_says(short_run("tinystories"), PROMPT, 12)
    whole = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=12,
                                      temperature=0)
    assert whole.choices[0].text == expected
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model=server.name, prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_chat_completion_equals_chat_streamed_or_not(client, server, short_run):
    expected = chat_says(short_run("tinystories"), PROMPT, 10)
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=server.name, messages=messages,
                                           max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=server.name, messages=messages,
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason


def test_echo_logprobs_score_the_prompt_as_the_model_does(client, server, short_run):
    import torch

    from bitnet_cli.use.loading import load_model
    reply = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=1,
                                      temperature=0, echo=True, logprobs=1)
    scores = reply.choices[0].logprobs
    loaded = load_model(str(short_run("tinystories")))
    ids = loaded.tokenizer.encode(PROMPT).ids
    assert reply.choices[0].text.startswith(PROMPT)
    assert len(scores.tokens) == len(ids) + 1 and scores.token_logprobs[0] is None
    with torch.inference_mode():
        logprobs = torch.log_softmax(loaded.model(torch.tensor([ids]))[0].float(), -1)
    expected = [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert scores.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 1 for top in scores.top_logprobs[1:])
    chunks = list(client.completions.create(model=server.name, prompt=PROMPT, max_tokens=1,
                                            temperature=0, echo=True, logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    for field in ("tokens", "token_logprobs", "text_offset"):
        assert sum((getattr(s, field) for s in streamed), []) == getattr(scores, field)
    scored_alone = client.completions.create(model=server.name, prompt=ids, max_tokens=0,
                                             echo=True, logprobs=0)
    assert scored_alone.choices[0].logprobs.token_logprobs == scores.token_logprobs[:len(ids)]


def test_stop_strings_cut_the_text_before_them(server, client):
    text = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=12,
                                     temperature=0).choices[0].text
    stop = text[3:5]
    cut = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=12,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_curl_shows_a_well_formed_event_stream(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", f"{server.url}/v1/completions", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    events = out.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


BAD = [  # (body, status, words the message holds)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "other", "prompt": "x"}, 404, "does not exist"),
    ({"prompt": "x " * 80, "max_tokens": 4}, 400, "context"),
    ({"prompt": "x", "max_tokens": 0}, 400, "at least 1"),
    ({"prompt": "x", "max_tokens": 10**6}, 400, "context"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": 5}, 400, "prompt: must be a string"),
    ({"prompt": [10**9]}, 400, "outside the vocabulary"),
    ({"prompt": ""}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt: field required"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop"),
    ({"prompt": "x", "n": 2}, 400, "n must be 1"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(b)[:40] for b, _, _ in BAD])
def test_a_bad_completion_request_is_a_4xx_and_the_next_is_answered(server, body, status, words):
    code, reply = call(server.url, "POST", "/v1/completions", body)
    assert code == status, reply
    error = reply["error"]
    assert words.lower() in error["message"].lower() and error["type"]
    assert call(server.url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200


def test_bad_chat_requests_and_routes(server):
    chat = lambda messages: call(server.url, "POST", "/v1/chat/completions",
                                 {"messages": messages})
    assert chat([])[0] == 400
    assert "user message" in chat([{"role": "system", "content": "x"}])[1]["error"]["message"]
    assert chat([{"role": "wizard", "content": "x"}])[0] == 400
    assert chat([{"role": "user", "content": 7}])[1]["error"]["message"].startswith(
        "messages.0.content: must be a string")
    assert call(server.url, "GET", "/v1/nothing")[0] == 404
    assert call(server.url, "GET", "/v1/completions")[0] == 405
    code, big = call(server.url, "POST", "/v1/completions", b" " * (5 * 2**20))
    assert code == 413 and "MiB" in big["error"]["message"]
    assert call(server.url, "GET", "/health")[1]["status"] == "ok"


@pytest.fixture
def long_run(tmp_path):
    """A small random model with room for long replies that never ends one by itself: its
    output row for the end-of-text token is zero, so that token's logit is 0 where the largest
    of the others' hundreds of random logits is above it, and greedy replies (temperature 0)
    run to max_tokens: a stream that lasts."""
    tokenizer = story_tokenizer()
    end = tokenizer.token_to_id(EOT)
    return random_checkpoint(tmp_path / "long", "tinystories", tokenizer,
                             tweak=lambda model: model.lm_head.weight[end].zero_(),
                             max_position_embeddings=4096)


def long_stream(server):
    """A streamed reply of thousands of tokens, begun: (connection, its lines from now on)."""
    connection, lines = open_stream(server.url, {"prompt": PROMPT, "max_tokens": 4000,
                                                 "temperature": 0})
    assert next(line for line in lines if line.startswith("data: {"))
    return connection, lines


def test_a_hang_up_frees_its_sequence_and_sigterm_ends_open_streams_and_exits_0(long_run):
    with ServerProcess(long_run.parent.parent, str(long_run)) as server:
        connection, lines = long_stream(server)
        assert call(server.url, "GET", "/health")[1]["streams"] == 1
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        server.wait_for(r"POST /v1/completions 200 .*(cancelled|hung up)", 30)
        past_a_step(server.url)  # the engine drops it before its next step
        assert call(server.url, "GET", "/health")[1] == {"status": "ok", "streams": 0,
                                                         "waiting": 0}
        assert_a_signal_ends_the_stream(server, signal.SIGTERM)


@pytest.mark.slow  # the default suite sends SIGTERM (above)
def test_ctrl_c_ends_open_streams_and_exits_0(long_run):
    with ServerProcess(long_run.parent.parent, str(long_run)) as server:
        assert_a_signal_ends_the_stream(server, signal.SIGINT)


def assert_a_signal_ends_the_stream(server, sig) -> None:
    connection, lines = long_stream(server)
    server.process.send_signal(sig)
    rest = [line for line in lines if line]
    connection.close()
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert server.stop(sig) == 0


def test_an_api_key_guards_the_api_not_the_page(long_run, monkeypatch):
    monkeypatch.setenv("BITNET_API_KEY", "sesame")
    with ServerProcess(long_run.parent.parent, str(long_run)) as server:
        assert call(server.url, "GET", "/v1/models")[0] == 401
        code, wrong = call(server.url, "GET", "/v1/models", headers={"Authorization": "Bearer no"})
        assert code == 401 and wrong["error"]["code"] == "invalid_api_key"
        right = {"Authorization": "Bearer sesame"}
        assert call(server.url, "GET", "/v1/models", headers=right)[0] == 200
        assert call(server.url, "GET", "/health")[0] == 200
        assert call(server.url, "GET", "/")[0] == 200


def test_exposure_and_bad_flags_are_one_line_before_loading(tmp_path):
    cases = [(["--host", "0.0.0.0"], "--api-key"), (["--port", "70000"], "--port"),
             (["--max-streams", "0"], "--max-streams"), (["--api-key", " "], "empty")]
    for options, words in cases:
        out = invoke("serve", "no-such-run", *options, code=1)
        assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert "Traceback" not in out.stderr


def test_a_port_in_use_is_one_line(long_run):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        out = invoke("serve", str(long_run), "--port", taken.getsockname()[1], code=1)
        assert "cannot listen" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    finally:
        taken.close()
