"""`bitnet bench`: every section runs and renders, and its byte counts are right. Its speed
numbers are measurements to read, never asserted."""

import io

import pytest
import torch

from rich.console import Console

from bitnet_cli.bench import decode_speed, shapes, train_speed
from bitnet_cli.nn import kernel
from bitnet_cli.ui.bench_tables import bench_report
from bitnet_cli.config.presets import PRESETS
from tests.cli import invoke


def run_sections() -> tuple[dict, str]:
    """Every section of `bitnet bench` on the smallest shape, with the byte counts checked, and
    the report as rendered."""
    shape = PRESETS["simple"].sizes["tiny"].model
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f  # q, o; k, v; gate, up, down
    vocab = PRESETS["simple"].vocab_size

    size = decode_speed.checkpoint_size("simple", "tiny")
    assert size["latent_bytes"] == 4 * layers * per_layer
    assert size["packed_bytes"] == layers * per_layer // 4 + 4 * 7 * layers  # + a scale each
    assert size["ratio"] > 15

    decode = decode_speed.decode("simple", "tiny", with_llama_cpp=True)
    engines = decode["engines"]
    # One byte per ternary weight and a float16 (or int8) head, against float32 for both.
    assert engines["int8 per-op"]["weight_bytes_per_token"] == (
        layers * per_layer + 2 * vocab * d + 4 * d)
    if "int8, int8 head" in engines:  # the fused step: where the extension builds
        assert engines["int8, int8 head"]["weight_bytes_per_token"] == (
            layers * per_layer + vocab * d + 4 * d)
    # 2 bits a weight, each row padded to whole blocks of 256 (the 64-wide rows here: 4x).
    padded = 2 * d * 256 + 2 * kv * 256 + 2 * f * 256 + d * (-(-f // 256) * 256)
    if "2bit" in engines:
        assert engines["2bit"]["weight_bytes_per_token"] == (
            layers * padded // 4 + 2 * vocab * d + 4 * d)
    assert engines["float32"]["weight_bytes_per_token"] == 4 * layers * per_layer + 4 * vocab * d + 4 * d
    assert all(e["tok_per_s"] > 0 for e in engines.values())
    # llama.cpp decoded the same weights (llama-cpp-python is in the test extra), the ratio kept
    assert decode["llama_cpp"]["tok_per_s"] > 0 and decode["llama_cpp"]["gguf_bytes"] > 0
    int8 = engines["int8 per-op"]
    assert int8["vs_llama_cpp"] == int8["tok_per_s"] / decode["llama_cpp"]["tok_per_s"]
    assert decode["layers"]["count"] == 7 * layers
    assert decode["layers"]["int8"]["vs_float"] > 0 and decode["layers"]["int8"]["gb_s"] > 0

    results = {"machine": shapes.machine(),
               "train_step": [train_speed.train_step("simple", "tiny", 4, 16)],
               "data": [row for row in train_speed.data(repeats=1)
                        if row["shape"] in ("tictactoe tiny", "tinystories tiny")],
               "decode": [decode], "size": [size],
               "memory": [train_speed.rss("idle", "-")],
               "kv_cache": decode_speed.kv_cache("simple", "tiny", new_tokens=8)}
    assert results["memory"][0]["peak_rss_bytes"] > 0
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(bench_report(results))
    text = console.export_text()
    assert "making one batch" in text
    assert "tictactoe tiny" in text and "tinystories tiny" in text
    for title in ("training step", "decode with the KV cache", "BitLinear layers alone",
                  "llama.cpp", "2-bit packed", "memory", "re-running"):
        assert title in text
    return results, text


def test_sections_run_count_bytes_and_render_without_a_compiler(monkeypatch):
    """What a machine without a C++ compiler gets: every section, the rows that need one
    (the 2bit engine, the fused step, compiling) left out and said why. (Compiling costs half a minute on a cold cache; the slow test below does it.)"""
    import torch._inductor.config  # noqa: F401  it reads $CXX once, at import: not the fake one
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(kernel, "_loaded", {})  # as in a fresh process
    results, text = run_sections()
    why = "no C++ compiler for torch.compile (CXX=no-such-compiler does not run)"
    assert results["decode"][0]["notes"] == [
        "no 2bit engine: no C++ compiler (CXX=no-such-compiler does not run)",
        "no fused int8 step: no C++ compiler (CXX=no-such-compiler does not run)"]
    assert "2bit" not in results["decode"][0]["layers"]
    assert results["train_step"][0]["compiled"] is None
    assert results["train_step"][0]["compile_problem"] == why
    assert set(results["decode"][0]["engines"]) == {"float32", "bf16 autocast", "int8 per-op"}
    assert "note: no fused int8 step: no C++ compiler (CXX=no-such-compiler" in text


@pytest.mark.slow
def test_sections_run_count_bytes_and_render_compiled():
    results, text = run_sections()
    step = results["train_step"][0]
    assert step["compiled"]["vs_eager"] > 0 and step["compiled"]["first_step_s"] > 0
    assert set(results["decode"][0]["engines"]) == {
        "float32", "bf16 autocast", *(name for name, _, _, _ in decode_speed.ENGINES)}
    assert "compiled / eager" in text
    assert results["decode"][0]["layers"]["2bit"]["gb_s"] > 0


def test_without_llama_cpp_the_row_says_not_installed(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    model = shapes.build("simple", "tiny", 16)
    assert decode_speed.llama_cpp_decode(model, [1, 2]) == {
        "missing": "not installed (pip install llama-cpp-python)"}


def test_bench_on_cuda_without_one_is_one_clear_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("bench", "--device", "cuda", code=1)
    assert result.output.count("\n") == 1 and "--device cuda is not available here" in result.output
    assert "Traceback" not in result.output


def test_bench_on_an_unknown_device_is_one_clear_line():
    result = invoke("bench", "--device", "tpu", code=1)
    assert result.output.count("\n") == 1 and "--device must be cpu or cuda" in result.output


def test_a_model_built_from_codes_has_no_float_weights_and_decodes():
    """--2b4t's construction, on a small shape: every ternary layer packed from random codes,
    one float16 table for the tied embedding and head, nothing left on the meta device."""
    from bitnet_cli.bench.released_shape import build_from_codes
    from bitnet_cli.config.settings import ModelConfig
    from bitnet_cli.nn.bitlinear import BitLinear
    from bitnet_cli.nn.model import generate
    from bitnet_cli.nn.packed import PackedLinear
    config = ModelConfig(vocab_size=300, hidden_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=320,
                         max_position_embeddings=32)
    model, engine = build_from_codes(config)
    assert engine == "2bit"
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 2 * 4  # qkv, o, gate_up, down
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert not any(t.dtype == torch.float32 and t.dim() == 2 and t.shape[0] >= 128
                   for t in tensors if t is not model.rope_cos and t is not model.rope_sin)
    assert len(list(generate(model, [1, 2, 3], 8))) == 8
    from bitnet_cli.nn.decoding import DecodeStep
    step = DecodeStep(model, compile=False)  # the fused step reads the float16 embedding
    assert step.fused
    from tests.contract import assert_greedy_agree, stepped_logits
    tokens = list(generate(model, [1, 2, 3], 8))
    assert_greedy_agree(stepped_logits(model, step, [1, 2, 3], tokens),
                        stepped_logits(model, model, [1, 2, 3], tokens))


def test_llama_cpp_reads_a_gguf_written_from_random_codes():
    """--2b4t's llama.cpp row: the file written a tensor at a time from RandomCodes loads and
    decodes, on a small shape (rows of 128 and 256: F16 and TQ2_0 codes)."""
    from bitnet_cli.bench.released_shape import RandomCodes
    from bitnet_cli.config.settings import ModelConfig
    state = RandomCodes(ModelConfig(vocab_size=300, hidden_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=384, max_position_embeddings=64))
    assert state["model.embed_tokens.weight"].dtype == torch.float16
    assert set(state["model.layers.0.mlp.up_proj.weight"].unique().tolist()) == {-1.0, 0.0, 1.0}
    result = decode_speed.llama_cpp_decode(state.model, [1, 2, 3], state)
    assert result["tok_per_s"] > 0 and result["gguf_bytes"] > 0


@pytest.mark.slow
def test_the_2b4t_shape_decodes_in_a_fraction_of_its_float32_size():
    """2.4B parameters would be 9.6 GB in float32; built from codes, the process stays far below."""
    from bitnet_cli.bench.released_shape import decode_2b4t
    result = decode_2b4t()
    assert result["llama_cpp"]["tok_per_s"] > 0
    for name, row in result["engines"].items():
        assert row["engine"] == "2bit, fused" and row["tok_per_s"] > 0, name
        assert row["peak_rss_bytes"] < 3 * 2**30, name
        assert set(row["parts_ms"]) == {*decode_speed.STEP_PARTS, "outside the step"}
    # ~0.4 GB of 2-bit codes; the head: float16 (2 bytes a weight) or int8 (one and a scale)
    head = 128256 * 2560
    float16, int8 = (result["engines"][name]["weight_bytes_per_token"]
                     for name in ("2bit", "2bit, int8 head"))
    assert float16 - int8 == head


def test_a_model_built_from_codes_with_the_int8_head_decodes_fused():
    """--2b4t's int8-head row: the float16 table's rows rounded to int8, the fused step."""
    from bitnet_cli.bench.released_shape import build_from_codes
    from bitnet_cli.config.settings import ModelConfig
    from bitnet_cli.nn.decoding import DecodeStep
    from bitnet_cli.nn.int8 import Int8Linear
    from bitnet_cli.nn.model import generate
    config = ModelConfig(vocab_size=300, hidden_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=320,
                         max_position_embeddings=32)
    model, engine = build_from_codes(config, "int8")
    assert engine == "2bit" and isinstance(model.lm_head, Int8Linear)
    assert model.lm_head.codes.shape == (300, 128)
    step = DecodeStep(model, compile=False)
    assert step.fused and len(list(generate(model, [1, 2, 3], 8, step=step))) == 8
