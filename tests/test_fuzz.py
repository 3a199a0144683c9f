"""A damaged or hostile run folder is input too: every file of a run, broken in every way we
know, under every command that reads it. Each case ends in success or in one clear line (exit 1),
never a traceback, and changes nothing outside the run folder."""

import json
import os
import random
import shutil

import pytest
from safetensors.torch import load, save

from bitnet_cli.cli import app
from tests.cli import home_at, invoke, runner, snapshot

VICTIM, HEALTHY = "victim", "healthy"
CKPT = "CKPT"  # the newest checkpoint's folder, whatever its name is

COMMANDS = {
    "status": ["status"],
    "status RUN": ["status", VICTIM],
    "status --json": ["status", "--json"],
    "status RUN --json": ["status", VICTIM, "--json"],
    "plot RUN": ["plot", VICTIM],
    "compare RUN": ["compare", HEALTHY, VICTIM],
    "chat RUN": ["chat", VICTIM, "--prompt", "abc=", "--temperature", "0"],
    "eval RUN --json": ["eval", VICTIM, "--json"],
    "play RUN": ["play", VICTIM],
    "export RUN": ["export", VICTIM, "--format", "hf", "--out", "{out}"],
    "resume RUN": ["resume", VICTIM, "--steps", "16"],
    "runs rm RUN": ["runs", "rm", VICTIM, "--yes"],  # a damaged run is one you may remove
}
LISTING = ["status", "status --json"]
DETAIL = ["status RUN", "status RUN --json"]
LOADERS = ["chat RUN", "eval RUN --json", "play RUN", "export RUN"]

# Each file of a run: what it holds, and the commands that read it. Every command resolves
# the run through the home's config.json files; for that, and for `latest`, one loader stands
# for all four (they share inference.load_model), which keeps the file to a few minutes.
FILES = {
    "config.json": ("json", LISTING + DETAIL + ["plot RUN", "compare RUN", "chat RUN",
                                                "resume RUN", "runs rm RUN"]),
    "state.json": ("json", LISTING + DETAIL + ["compare RUN", "resume RUN", "runs rm RUN"]),
    "metrics.jsonl": ("jsonl", LISTING + DETAIL + ["plot RUN", "compare RUN", "resume RUN"]),
    "tokenizer.json": ("json", ["resume RUN"]),
    "checkpoints/latest": ("text", DETAIL + ["chat RUN", "resume RUN", "runs rm RUN"]),
    f"checkpoints/{CKPT}/model.safetensors": ("tensors", DETAIL + LOADERS + ["resume RUN"]),
    f"checkpoints/{CKPT}/optim.safetensors": ("tensors", DETAIL + ["resume RUN"]),
    f"checkpoints/{CKPT}/trainer.json": ("json", DETAIL + LOADERS + ["resume RUN"]),
    f"checkpoints/{CKPT}/tokenizer.json": ("json", ["chat RUN", "export RUN"]),
}


def _swap(value):
    """A value of another JSON type."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "abc"
    if isinstance(value, str):
        return 3
    if isinstance(value, dict):
        return []
    return {"a": 1}


NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def _non_finite(value, depth=0):
    """Every number replaced by NaN, Infinity or -Infinity in turn."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return NON_FINITE[depth % 3]
    if isinstance(value, dict):
        return {k: _non_finite(v, depth + i) for i, (k, v) in enumerate(value.items())}
    if isinstance(value, list):
        return [_non_finite(v, depth + i) for i, v in enumerate(value)]
    return value


def _objects(data: bytes, kind: str, change) -> bytes:
    """`change` applied to the JSON object (or to every row of a .jsonl file)."""
    if kind == "jsonl":
        rows = [json.loads(line) for line in data.decode().splitlines()]
        return "".join(json.dumps(change(row)) + "\n" for row in rows).encode()
    return json.dumps(change(json.loads(data))).encode()


JSON_CORRUPTIONS = {
    "invalid json": lambda data, kind: b'{"step": 1, not json' + (b"\n" if kind == "jsonl" else b""),
    "not an object": lambda data, kind: _objects(data, kind, lambda obj: [3]),
    "missing keys": lambda data, kind: _objects(data, kind, lambda obj: {}),
    "wrong types": lambda data, kind: _objects(
        data, kind, lambda obj: {k: _swap(v) for k, v in obj.items()}),
    "wrong nested types": lambda data, kind: _objects(
        data, kind, lambda obj: {k: {kk: _swap(vv) for kk, vv in v.items()}
                                 if isinstance(v, dict) else v for k, v in obj.items()}),
    "non-finite numbers": lambda data, kind: _objects(data, kind, _non_finite),
}
BYTE_CORRUPTIONS = {
    "truncated": lambda data, kind: data[:len(data) // 2],
    "random bytes": lambda data, kind: random.Random(0).randbytes(max(len(data), 64)),
    "empty": lambda data, kind: b"",
}


def _retensor(data: bytes, change) -> bytes:
    """`change` applied to the first tensor of a safetensors file."""
    tensors = load(data)
    name = sorted(tensors)[0]
    tensors[name] = change(tensors[name])
    return save(tensors)


TENSOR_CORRUPTIONS = {
    "wrong shape": lambda data, kind: _retensor(data, lambda t: t.flatten()[:-1].clone()),
    "nan tensor": lambda data, kind: _retensor(data, lambda t: t.float() * float("nan")),
}
TEXT_CORRUPTIONS = {
    "missing step": lambda data, kind: b"step_000999999\n",
    "path outside": lambda data, kind: f"../../{HEALTHY}/checkpoints\n".encode(),
}
CORRUPTIONS = {
    "json": {**JSON_CORRUPTIONS, **BYTE_CORRUPTIONS},
    "jsonl": {**JSON_CORRUPTIONS, **BYTE_CORRUPTIONS},
    "tensors": {**TENSOR_CORRUPTIONS, **BYTE_CORRUPTIONS},
    "text": {**TEXT_CORRUPTIONS, **BYTE_CORRUPTIONS},
}
REMOVALS = ("deleted", "symlink outside")

CASES = [pytest.param(file, corruption, command, id=f"{file}|{corruption}|{command}")
         for file, (kind, commands) in FILES.items()
         for corruption in [*CORRUPTIONS[kind], *REMOVALS]
         for command in commands]


def test_the_matrix_covers_every_file_and_command():
    print(f"{len(CASES)} fuzz cases")
    assert len(CASES) == 468
    assert {c for _, (_, commands) in FILES.items() for c in commands} == set(COMMANDS)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A home with the victim (12 steps, checkpoints at 4, 8, 12) and a healthy run beside it,
    trained once for the module."""
    home = tmp_path_factory.mktemp("fuzz-template")
    with home_at(home, cache=home.parent / "fuzz-cache"):
        invoke("train", "simple", "--steps", "12", "--save-every", "4", "--eval-every", "4",
               "--batch-size", "8", "--no-compile", "--name", VICTIM)
        invoke("train", "simple", "--steps", "4", "--save-every", "4", "--eval-every", "4",
               "--batch-size", "8", "--no-compile", "--name", HEALTHY)
    return home


@pytest.mark.parametrize("file, corruption, command", CASES)
def test_damaged_run(template, bitnet_home, tmp_path, file, corruption, command):
    shutil.copytree(template, bitnet_home)
    run = bitnet_home / "runs" / VICTIM
    newest = (run / "checkpoints" / "latest").read_text().strip()
    target = run / file.replace(CKPT, newest)
    kind = FILES[file][0]
    original = target.read_bytes()
    outside = tmp_path / "outside" / target.name
    outside.parent.mkdir()
    outside.write_bytes(original)  # what a planted link points at: writes through it show
    if corruption == "deleted":
        target.unlink()
    elif corruption == "symlink outside":
        target.unlink()
        target.symlink_to(outside)
    else:
        target.write_bytes(CORRUPTIONS[kind][corruption](original, kind))
    out = tmp_path / "export"
    args = [a.replace("{out}", str(out)) for a in COMMANDS[command]]
    before = snapshot(tmp_path, skip=[str(run), str(out)])

    result = runner.invoke(app, args, input="")
    output = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{output}")
    assert result.exit_code in (0, 1), output
    assert "Traceback" not in output
    assert sum(line.startswith("error:") for line in output.splitlines()) <= 1, output
    if result.exit_code == 0 and "--json" in args:
        json.loads(result.stdout)
    assert snapshot(tmp_path, skip=[str(run), str(out)]) == before, "changed outside the run"
    if command == "runs rm RUN" and result.exit_code == 0:
        assert not os.path.lexists(run)
