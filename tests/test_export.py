"""Export: transformers loads what bitnet writes and computes the same logits and tokens; the GGUF
reads back with the ternary weights exact; bad input fails in one line and writes nothing."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bitnet_cli.nn.bitlinear import ternary_codes, unpack_ternary, weight_quant
from bitnet_cli.data.shards import EOT
from bitnet_cli.tasks import load_experiment
from bitnet_cli.use.export import linear_weight_bytes
from bitnet_cli.use.loading import PROJECTIONS
from bitnet_cli.use.loading import load_model
from bitnet_cli.nn.model import generate
from tests.cli import home_at, invoke, needs_torch_compile, optional
from tests.contract import assert_greedy_agree, same_continuation
from tests.models import random_checkpoint, story_tokenizer

PROMPT = "d3=efg;k5=lmnop;a2="  # 19 tokens; the tiny simple model's context is 32


@pytest.fixture(scope="module", params=["relu2", "silu"])
def trained_run(tmp_path_factory, request):
    """A tiny `simple` model trained for 30 steps: weights well away from their init; one for
    each FFN activation."""
    home = tmp_path_factory.mktemp("home")
    with home_at(home):
        invoke("train", "simple", "--steps", "30", "--eval-every", "30", "--save-every", "30",
               "--no-compile", "--name", "exported", "--activation", request.param)
    return home / "runs" / "exported"


@pytest.mark.parametrize("fmt", ["hf", "hf-packed"])
def test_transformers_computes_what_bitnet_computes(trained_run, tmp_path, fmt):
    out = tmp_path / fmt
    invoke("export", trained_run, "--format", fmt, "--out", out)
    ours = load_model(str(trained_run), engine="float")
    transformers = optional("transformers")
    if fmt == "hf-packed":
        needs_torch_compile()  # transformers unpacks packed weights with torch.compile
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(theirs).__name__ == "BitNetForCausalLM" and theirs.dtype == torch.float32
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quantization_mode"] == ("offline" if fmt == "hf-packed"
                                                                  else "online")
    assert config["hidden_act"] == ours.config.activation

    ids = tokenizer(PROMPT)["input_ids"]
    assert ids == ours.tokenizer.encode(PROMPT).ids
    assert tokenizer.decode(ids) == PROMPT
    assert tokenizer.eos_token == ";" and theirs.generation_config.eos_token_id == ids[6]

    # Another implementation of the same float32 maths: the engines' contract (measured 4e-7).
    x = torch.tensor([ids])
    with torch.no_grad():
        assert_greedy_agree(theirs(x).logits, ours.model(x))
        tokens = list(generate(ours.model, ids, 12))
        chose = ours.model(torch.tensor([ids + tokens[:-1]]))[0, len(ids) - 1:]
    greedy = theirs.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert same_continuation(greedy[0, len(ids):].tolist(), chose, tokens)


def test_packed_file_holds_exact_ternary_weights_in_a_tenth_of_the_bytes(trained_run, tmp_path):
    invoke("export", trained_run, "--format", "hf-packed", "--out", tmp_path / "packed")
    tensors = load_file(tmp_path / "packed" / "model.safetensors")
    model = load_model(str(trained_run), engine="float", latent=True).model
    stored = 0
    for i, layer in enumerate(model.model.layers):
        for projection in PROJECTIONS:
            name = f"model.layers.{i}.{projection}"
            weight = layer.get_submodule(projection).weight
            packed, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
            assert packed.dtype == torch.uint8
            assert packed.shape == (weight.shape[0] // 4, weight.shape[1])
            assert scale.dtype == torch.float32 and scale.shape == (1,)
            assert torch.equal(unpack_ternary(packed) * scale, weight_quant(weight))
            stored += packed.numel() + 4
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert "lm_head.weight" not in tensors  # tied
    latent, packed_bytes = linear_weight_bytes(model)
    assert packed_bytes == stored and packed_bytes <= latent / 10


def test_full_precision_twin_exports_as_plain_transformers_model(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "twin", quant="none", tie_word_embeddings=False)
    invoke("export", checkpoint, "--format", "hf", "--out", tmp_path / "hf")
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    theirs = optional("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ours = load_model(str(checkpoint), engine="float").model
    assert not torch.equal(theirs.lm_head.weight, theirs.model.embed_tokens.weight)
    x = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max().item() < 1e-4


def test_transformers_tokenizer_of_a_text_model_matches_bitnet(tmp_path):
    tokenizer = story_tokenizer()
    checkpoint = random_checkpoint(tmp_path / "text", "tinystories", tokenizer)
    invoke("export", checkpoint, "--format", "hf", "--out", tmp_path / "hf")
    theirs = optional("transformers").AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Once upon a time, a little fox found a red ball.<|endoftext|>"
    assert theirs(text)["input_ids"] == tokenizer.encode(text).ids
    assert theirs.eos_token == EOT


@pytest.mark.parametrize("experiment, activation", [("simple", "relu2"), ("tinystories", "silu")])
def test_gguf_reads_back_with_exact_ternary_weights(tmp_path, experiment, activation):
    tokenizer = story_tokenizer() if experiment == "tinystories" else None
    # down_proj rows are 256 long (TQ2_0); every other projection's are 64 (the F16 fallback).
    checkpoint = random_checkpoint(tmp_path / "run", experiment, tokenizer, intermediate_size=256,
                                   activation=activation)
    result = invoke("export", checkpoint, "--format", "gguf", "--out", tmp_path / "gguf")
    caveat = [line for line in result.stderr.splitlines() if "llama.cpp" in line]
    if activation == "relu2":  # one line saying which llama.cpp computes this model right
        assert len(caveat) == 1 and "--activation silu" in caveat[0], result.stderr
    else:
        assert caveat == [], result.stderr
    reader = gguf.GGUFReader(tmp_path / "gguf" / "model.gguf")
    loaded = load_model(str(checkpoint), engine="float", latent=True)
    model, config = loaded.model, loaded.config

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "bitnet"
    assert field("bitnet.hidden_activation") == activation
    assert (field("bitnet.block_count"), field("bitnet.embedding_length"),
            field("bitnet.feed_forward_length"), field("bitnet.attention.head_count"),
            field("bitnet.attention.head_count_kv"), field("bitnet.context_length")) == (2, 64, 256, 4, 2, 32)
    assert field("bitnet.rope.freq_base") == config.rope_theta

    tensors = {t.name: t for t in reader.tensors}
    layer_names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_sub_norm", "attn_output",
                   "ffn_norm", "ffn_gate", "ffn_up", "ffn_sub_norm", "ffn_down"]
    ternary = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in range(2) for n in layer_names}
    expected |= {f"blk.{i}.{n}.scale" for i in range(2) for n in ternary}
    assert set(tensors) == expected

    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type == gguf.GGMLQuantizationType.F16
    assert np.array_equal(embedding.data, model.model.embed_tokens.weight.detach().half().numpy())
    for i, layer in enumerate(model.model.layers):
        for projection, name in zip(PROJECTIONS, ternary):
            weight = layer.get_submodule(projection).weight.detach()
            stored, scale = tensors[f"blk.{i}.{name}.weight"], tensors[f"blk.{i}.{name}.scale"]
            assert list(stored.shape) == [weight.shape[1], weight.shape[0]]  # ggml order
            assert stored.tensor_type == (gguf.GGMLQuantizationType.TQ2_0 if name == "ffn_down"
                                          else gguf.GGMLQuantizationType.F16)
            codes = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type))
            assert torch.equal(codes, ternary_codes(weight)[0])
            assert scale.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(codes * torch.from_numpy(scale.data.copy()), weight_quant(weight))

    vocab = [loaded.tokenizer.id_to_token(i) for i in range(config.vocab_size)]
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.tokens") == vocab
    stop = ";" if experiment == "simple" else EOT
    assert field("tokenizer.ggml.eos_token_id") == loaded.tokenizer.token_to_id(stop)
    merges = json.loads(loaded.tokenizer.to_str())["model"].get("merges", [])
    if merges:
        assert field("tokenizer.ggml.merges") == [" ".join(m) for m in merges]


def only_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("fmt", ["hf-packed", "gguf"])
def test_full_precision_run_has_nothing_to_pack(tmp_path, fmt):
    checkpoint = random_checkpoint(tmp_path / "twin", quant="none")
    result = invoke("export", checkpoint, "--format", fmt, "--out", tmp_path / "out", code=1)
    assert "--quant none" in only_error_line(result)
    assert not list(tmp_path.glob("out*"))


def test_shape_that_cannot_be_packed(tmp_path):
    # 1 key/value head of 6: k_proj and v_proj have 6 output rows, not a multiple of 4.
    checkpoint = random_checkpoint(tmp_path / "odd", hidden_size=12, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=32)
    result = invoke("export", checkpoint, "--format", "hf-packed", "--out", tmp_path / "out", code=1)
    assert "k_proj" in only_error_line(result) and "multiple of 4" in result.stderr
    assert not list(tmp_path.glob("out*"))


def test_gguf_needs_tied_embeddings(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "untied", tie_word_embeddings=False)
    result = invoke("export", checkpoint, "--format", "gguf", "--out", tmp_path / "out", code=1)
    assert "lm_head" in only_error_line(result)


def test_existing_output_is_never_overwritten(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for fmt in ("hf", "hf-packed", "gguf"):
        result = invoke("export", checkpoint, "--format", fmt, "--out", out, code=1)
        assert "not an empty folder" in only_error_line(result)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out.partial").exists()
    (out / "keep.txt").unlink()  # an empty folder is fine to fill
    invoke("export", checkpoint, "--format", "gguf", "--out", out)
    assert [p.name for p in out.iterdir()] == ["model.gguf"]


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    checkpoint = random_checkpoint(tmp_path / "run")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bitnet_cli.use.export.save_file", disk_full)
    result = invoke("export", checkpoint, "--format", "hf", "--out", tmp_path / "out", code=1)
    assert "No space left on device" in only_error_line(result)
    assert not list(tmp_path.glob("out*"))


def test_unknown_format(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "run")
    result = invoke("export", checkpoint, "--format", "onnx", "--out", tmp_path / "out", code=1)
    assert "hf, hf-packed, gguf" in only_error_line(result)


def readme_python(after_heading: str) -> str:
    """The first ```python block of the README after a heading."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index(after_heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def test_the_readme_transformers_snippet_answers_as_bitnet_chat_does(tmp_path, monkeypatch,
                                                                    short_run):
    """The snippet, run as written against an arithmetic export, prints `chat`'s answer."""
    optional("transformers")
    run = short_run("arithmetic")
    result = invoke("export", run, "--format", "hf-packed", "--out", tmp_path / "my-model-2bit")
    assert "012+035= for 12+35=" in result.stderr  # the export says which format it reads
    assert "pip install 'bitnet-cli[hf]'" in result.stdout
    loaded = load_model(str(run), engine="float")
    task = load_experiment("arithmetic")
    ids = loaded.tokenizer.encode(task.chat_prompt("12+35=")).ids
    stop = task.stop_ids(loaded.tokenizer)
    ours = loaded.tokenizer.decode(list(generate(loaded.model, ids, 5, stop_ids=stop)))
    monkeypatch.chdir(tmp_path)
    printed = []
    monkeypatch.setattr("builtins.print", lambda *args: printed.append(" ".join(map(str, args))))
    exec(readme_python("## Exporting a model"), {})
    assert printed == [ours.split(";")[0][::-1]]
