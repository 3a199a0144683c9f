"""The 2-bit ternary kernel and the 2bit engine: exact integer sums on every code path the CPU
has, the int8 engine's logits to the bit on trained models, and int8 with one note wherever the
kernel cannot be built."""

import os
import platform

import pytest
import torch

from bitnet_cli.nn import kernel, packed
from bitnet_cli.nn.bitlinear import BitLinear, pack_ternary
from bitnet_cli.nn.int8 import Int8Linear
from bitnet_cli.nn.model import generate
from bitnet_cli.store.checkpoint import step_dir_name
from bitnet_cli.use.loading import load_model
from tests.cli import invoke
from tests.contract import assert_greedy_agree, same_continuation
from tests.models import SHORT_STEPS
from tests.test_int8 import PROMPTS

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)


@pytest.fixture(scope="module")
def ops():
    ops, why = kernel.ternary_ops()
    assert ops is not None, why  # this machine has g++: the kernel must build here
    return ops


def path_names(ops):
    return [ops.path_name(number) for number in ops.isas()]


def test_each_path_is_offered_where_the_cpu_has_all_it_needs(ops):
    """A path is offered only where the CPU has every instruction it uses (AVX2's: FMA and F16C
    too; AVX-VNNI's and AVX-512's: AVX2's and theirs), up to what BITNET_KERNEL allows; the
    portable path runs anywhere."""
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    # x86 lists its features as "flags", AArch64 as "Features" (asimddp: sdot)
    flags = set(next((line for line in text.splitlines()
                      if line.startswith(("flags", "Features"))), "").split())
    avx2 = {"avx2", "fma", "f16c"} <= flags
    arm = platform.machine() in ("aarch64", "arm64")
    offered = {"portable"} | ({"avx2"} if avx2 else set()) | (
        {"avxvnni"} if avx2 and "avx_vnni" in flags else set()) | (
        {"avx512"} if avx2 and {"avx512f", "avx512bw", "avx512_vnni"} <= flags else set()) | (
        {"neon"} if arm else set()) | ({"neondot"} if arm and "asimddp" in flags else set())
    numbers = kernel.path_numbers(ops)
    forced = os.environ.get(kernel.FORCE)
    expected = {name for name in offered if not forced or numbers[name] <= numbers[forced]}
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
    with pytest.raises(RuntimeError, match="ternary codes must be -1, 0 or 1"):
        ops.pack(torch.tensor([[0] * 300, [-2] + [0] * 299], dtype=torch.int8))


@pytest.mark.parametrize("n,k", [(4, 1), (8, 255), (12, 256), (16, 257), (40, 1000), (4, 513)])
def test_released_codes_repack_as_packing_their_codes(ops, n, k):
    """An imported model's 2B4T bytes go straight into the kernel's layout: the same bytes as
    packing the codes they hold, and a stored 3 (no code) refused."""
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8,
                          generator=torch.Generator().manual_seed(n * k))
    released = pack_ternary(codes)
    assert torch.equal(ops.repack(released), ops.pack(codes))
    released[-1, -1] |= 3 << 6
    with pytest.raises(RuntimeError, match="must be 0, 1 or 2"):
        ops.repack(released)


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
    """Along a 64-token greedy decode of the float engine (or the context, if shorter), each
    path's per-op logits equal the int8 engine's exactly, and keep the engines' contract with
    the float engine's; so does each path's own greedy continuation."""
    checkpoint = str(short_run(experiment) / "checkpoints" / step_dir_name(SHORT_STEPS))
    int8, float_engine = load_model(checkpoint, engine="int8"), load_model(checkpoint, engine="float")
    context = int8.config.max_position_embeddings
    prompt = int8.tokenizer.encode(PROMPTS[experiment]).ids
    tokens = list(generate(float_engine.model, prompt, min(64, context - len(prompt))))
    sequence = torch.tensor([prompt + tokens])
    with torch.no_grad():
        expected = int8.model(sequence)
        chose = float_engine.model(sequence)[0, len(prompt) - 1:-1]
        for path in ops.isas():
            monkeypatch.setattr(packed, "KERNEL_PATH", path)
            two_bit = load_model(checkpoint)
            assert two_bit.engine == "2bit"
            assert torch.equal(two_bit.model(sequence), expected), path
            assert_greedy_agree(expected[0, len(prompt) - 1:-1], chose)
            assert same_continuation(list(generate(two_bit.model, prompt, len(tokens))), chose,
                                     tokens), path


class BrokenOps:
    """The real kernel, with one entry point wrong from path `from_path` up."""

    def __init__(self, ops, entry: str, from_path: int):
        self.ops, self.entry, self.from_path = ops, entry, from_path

    def __getattr__(self, name):
        real = getattr(self.ops, name)
        if name != self.entry:
            return real

        def wrong(*args):
            out = real(*args)
            if args[-1] >= self.from_path:  # every entry point takes its path last
                out.view(-1)[-1] += 1
            return out
        return wrong


@pytest.fixture
def restore_paths(ops):
    best = max(ops.isas())
    yield
    ops.limit_paths(best)


@pytest.mark.parametrize("entry", ["ternary_mm", "int8_mm", "ternary_linear", "half_linear",
                                   "decode_step", "decode_batch"])
def test_an_entry_point_that_fails_its_check_is_never_used(ops, short_run, monkeypatch,
                                                            restore_paths, entry):
    """Wrong on every path: the int8 engine decodes, after one line naming the entry point and
    path. Wrong only on the fastest path: the next path, after one note, and the 2bit engine."""
    run = short_run("arithmetic")
    paths = ops.isas()  # fastest first
    fastest = paths[0]
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.setattr(kernel, "build_kernel", lambda notice: BrokenOps(ops, entry, 1))
    result = invoke("chat", run, "--prompt", "012+035=")
    first, *rest = result.stderr.splitlines()
    assert first.startswith("2bit engine not used: ") and f"on path {fastest}" in first
    assert first.endswith("; decoding with the int8 engine") and len(rest) == 1
    assert ", int8 engine" in rest[0]

    if len(paths) > 1:
        monkeypatch.setattr(kernel, "_loaded", {})
        monkeypatch.setattr(kernel, "build_kernel", lambda notice: BrokenOps(ops, entry, fastest))
        result = invoke("chat", run, "--prompt", "012+035=")
        note, report = result.stderr.splitlines()
        assert note.startswith("note: the 2-bit kernel's ") and note.endswith(
            f"; using its {ops.path_name(paths[1])} path")
        assert ", 2bit engine" in report


def test_the_read_probe_and_the_step_profile(ops):
    """bench's yardstick and its profile: every path reads a buffer at some speed, and the fused
    step's clock counts each step and charges every part a time of its own."""
    from bitnet_cli.config.settings import ModelConfig
    from bitnet_cli.nn.fused_decode import FusedDecode
    from bitnet_cli.nn.int8 import to_int8
    from bitnet_cli.nn.kernel_check import SHAPE
    from bitnet_cli.nn.model import BitNetForCausalLM, KVCache
    for path in ops.isas():
        assert ops.read_bandwidth(8, 1, path) > 0
    model = BitNetForCausalLM(ModelConfig(**SHAPE)).eval()
    to_int8(model, ops=ops)
    step, cache = FusedDecode(model, ops), KVCache(model.config)
    ops.step_profile()
    for token in (1, 2, 3):
        step(torch.tensor([[token]]), cache)
    *seconds, steps = ops.step_profile()
    assert steps == 3 and len(seconds) == 4 and all(s >= 0 for s in seconds) and sum(seconds) > 0
    assert ops.step_profile()[-1] == 0  # asking starts the count again


def test_a_kernel_built_without_threads_says_so(ops, restore_paths):
    """Where the build had no OpenMP (a torch without its libomp on macOS), the kernel runs on
    one thread: one note says so, and the kernel is still used."""
    class OneThread:
        def __getattr__(self, name):
            return getattr(ops, name)

        def threaded(self):
            return False
    said, threads = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert kernel._checked(OneThread(), said.append) is not None
    finally:
        torch.set_num_threads(threads)
    assert said == ["note: the 2-bit kernel runs on one thread here (built without OpenMP)"]
