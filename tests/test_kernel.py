"""The 2-bit ternary kernel and the 2bit engine: exact integer sums on every code path the CPU
has, the int8 engine's logits to the bit on trained models, and int8 with one note wherever the
kernel cannot be built."""

import os
import subprocess
import sys

import pytest
import torch

from bitnet_cli.nn import kernel, packed
from bitnet_cli.nn.bitlinear import BitLinear
from bitnet_cli.nn.int8 import Int8Linear
from bitnet_cli.nn.model import generate
from bitnet_cli.store.checkpoint import step_dir_name
from bitnet_cli.use.loading import load_model
from tests.cli import invoke
from tests.models import SHORT_STEPS
from tests.test_int8 import PROMPTS


@pytest.fixture(scope="module")
def ops():
    ops, why = kernel.ternary_ops()
    assert ops is not None, why  # this machine has g++: the kernel must build here
    return ops


def path_names(ops):
    return [name for name, number in kernel.PATHS.items() if number in ops.isas()]


def test_this_cpu_runs_every_path(ops):
    """The machine the suite runs on has AVX-512 VNNI and AVX2; the portable path runs anywhere."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    expected = {"portable"} | ({"avx2"} if " avx2" in flags else set()) | (
        {"vnni"} if " avx512_vnni" in flags else set())
    assert set(path_names(ops)) == expected


@pytest.mark.parametrize("rows,k,n", [(1, 1, 1), (1, 768, 37), (2, 255, 4), (3, 256, 5),
                                      (4, 257, 9), (5, 1000, 3), (17, 513, 30), (64, 300, 7)])
def test_sums_are_exact_on_every_path(ops, rows, k, n):
    generator = torch.Generator().manual_seed(rows * 1000 + k)
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=generator)
    codes[0] = 0  # an all-zero weight row
    x = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=generator)
    x[-1] = 0  # a token whose codes are all zero
    if rows > 1:
        x[0] = 127  # the largest sums there are
        codes[-1] = 1
    exact = (x.long() @ codes.long().T).int()
    for path in ops.isas():
        assert torch.equal(ops.ternary_mm(x, ops.pack(codes), path), exact), path


def test_pack_refuses_codes_that_are_not_ternary(ops):
    with pytest.raises(RuntimeError, match="ternary codes must be -1, 0 or 1"):
        ops.pack(torch.tensor([[2]], dtype=torch.int8))


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-6, 1.0, 1e4, 1e30])
def test_a_layer_gives_the_int8_engines_floats_on_every_path(ops, monkeypatch, scale):
    torch.manual_seed(0)
    layer = BitLinear(300, 70)
    torch.nn.init.normal_(layer.weight, std=0.02)
    int8, two_bit = Int8Linear.stacking(layer), packed.PackedLinear.stacking(layer)
    x = torch.randn(9, 300) * scale
    x[1, :150] = 0
    with torch.no_grad():
        expected = int8(x)
        for path in ops.isas():
            monkeypatch.setattr(packed, "KERNEL_PATH", path)
            assert torch.equal(two_bit(x), expected), path


def test_the_cpu_default_engine_is_2bit(short_run):
    loaded = load_model(str(short_run("arithmetic")))
    assert loaded.engine == "2bit" and loaded.engine_note is None
    assert any(isinstance(m, packed.PackedLinear) for m in loaded.model.modules())


@pytest.mark.parametrize("experiment", list(PROMPTS))
def test_trained_models_decode_as_the_int8_engine_to_the_bit(ops, short_run, monkeypatch,
                                                              experiment):
    """At every position of a 64-token greedy decode (or the context, if shorter), each path's
    logits equal the int8 engine's exactly, and the tokens are the float engine's."""
    checkpoint = str(short_run(experiment) / "checkpoints" / step_dir_name(SHORT_STEPS))
    int8, float_engine = load_model(checkpoint, engine="int8"), load_model(checkpoint, engine="float")
    context = int8.config.max_position_embeddings
    prompt = int8.tokenizer.encode(PROMPTS[experiment]).ids
    tokens = list(generate(float_engine.model, prompt, min(64, context - len(prompt))))
    sequence = torch.tensor([prompt + tokens])
    with torch.no_grad():
        expected = int8.model(sequence)
        for path in ops.isas():
            monkeypatch.setattr(packed, "KERNEL_PATH", path)
            two_bit = load_model(checkpoint)
            assert two_bit.engine == "2bit"
            assert torch.equal(two_bit.model(sequence), expected), path
            assert list(generate(two_bit.model, prompt, len(tokens))) == tokens, path


def test_without_a_compiler_it_is_int8_and_one_note(short_run, monkeypatch):
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    run = short_run("arithmetic")
    result = invoke("chat", run, "--prompt", "012+035=")
    assert result.stderr.splitlines()[0] == (
        "2bit engine not used: no C++ compiler (CXX=/nonexistent/g++ does not run); "
        "decoding with the int8 engine")
    assert len(result.stderr.splitlines()) == 2  # and chat's line of figures
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.delenv("CXX")
    assert invoke("chat", run, "--prompt", "012+035=").stdout == result.stdout


def test_a_path_without_a_compiler_still_chats(short_run, tmp_path):
    """As a pipx install on a machine with no g++: the kernel is never built, chat answers."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    env.pop("CXX", None)
    done = subprocess.run([sys.executable, "-m", "bitnet_cli", "chat", str(short_run("simple")),
                           "--prompt", "d3="], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == ("2bit engine not used: no C++ compiler (g++ does not "
                                           "run); decoding with the int8 engine")
    assert done.stdout.strip() and not (tmp_path / "extensions").exists()


@pytest.mark.slow
def test_a_damaged_build_is_rebuilt_and_two_processes_build_once(tmp_path):
    """Two processes start on an empty build folder at once: one compiles, the other waits on
    the lock and loads that build. Then the built library is damaged: the next process says
    nothing is wrong, removes it, compiles again and still gets exact sums."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    check = ("from bitnet_cli.nn import kernel as k; ops, why = k.ternary_ops(); "
             "assert ops is not None, why; print('ok')")
    starts = [subprocess.Popen([sys.executable, "-c", check], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in starts]
    assert [out for out, _ in outputs] == ["ok\n", "ok\n"], outputs
    assert sum("compiling" in err for _, err in outputs) >= 1
    (library,) = tmp_path.glob("*/*.so")
    library.write_bytes(b"not a shared library")
    again = subprocess.run([sys.executable, "-c", check], env=env, text=True,
                           capture_output=True, timeout=600)
    assert again.stdout == "ok\n", again.stderr
    assert library.read_bytes() != b"not a shared library"


def test_an_unwritable_build_folder_is_int8_and_one_note(short_run, monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocked / "kernels"))
    loaded = load_model(str(short_run("simple")))
    assert loaded.engine == "int8"
    assert loaded.engine_note.startswith("2bit engine not used: the ternary kernel did not build (")
