"""`bitnet import` of a full-precision LlamaForCausalLM, written here offline by transformers' own
classes (GQA, a tied or untied head, Llama 3's RoPE scaling past its original context, a bf16
file): the float engine computes transformers' logits and greedy continuation, chat, eval and
status take the run, and `export --format hf` is a LlamaForCausalLM that transformers loads with
the same logits. What a Llama's relatives compute beyond bitnet's model is one line, no run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet_cli.data.shards import EOT
from bitnet_cli.nn.model import generate
from bitnet_cli.use.loading import load_model
from tests.cli import invoke, optional
from tests.contract import same_continuation
from tests.models import story_tokenizer

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)

# 48 ids: positions past the llama3 source's original context of 32
IDS = [(7 + 37 * i) % 300 + 5 for i in range(48)]
TOLERANCE = 1e-4  # max |logit| apart from transformers' float32 (seen: ~1e-6)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CASES = {"tied": dict(tie_word_embeddings=True),
         "untied": dict(tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
         "llama3": dict(tie_word_embeddings=False, rope_parameters=LLAMA3),
         "bf16": dict(tie_word_embeddings=True)}


def llama(transformers, vocab, eos, **changes):
    """A tiny Llama with weights far from their init (norms too), so a wrong tensor or RoPE
    moves the logits by far more than TOLERANCE."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, eos_token_id=eos, **{**SHAPE, **changes}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (source folder, the model transformers loads from it in float32)."""
    transformers = optional("transformers")
    root, tokenizer = tmp_path_factory.mktemp("llama"), story_tokenizer()
    vocab, eos = tokenizer.get_vocab_size(), tokenizer.token_to_id(EOT)
    made = {}
    for name, changes in CASES.items():
        model = llama(transformers, vocab, eos, **changes)
        (model.to(torch.bfloat16) if name == "bf16" else model).save_pretrained(root / name)
        tokenizer.save(str(root / name / "tokenizer.json"))
        made[name] = (root / name, transformers.AutoModelForCausalLM.from_pretrained(
            root / name, dtype=torch.float32).eval())
    return made


def max_apart(got, expected) -> float:
    return float((got - expected).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_an_imported_llama_computes_what_transformers_does(sources, bitnet_home, tmp_path, case):
    folder, theirs = sources[case]
    invoke("import", folder, "--name", case)
    run = bitnet_home / "runs" / case
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["quant"], model["sub_norms"], model["activation"]) == ("none", False, "silu")
    assert model["tie_word_embeddings"] == (case in ("tied", "bf16"))
    assert model["rope_scaling"] == ({k: v for k, v in LLAMA3.items() if k != "rope_theta"}
                                     if case == "llama3" else None)
    stored = load_file(str(next((run / "checkpoints").glob("step_*")) / "model.safetensors"))
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == (
        torch.bfloat16 if case == "bf16" else torch.float32)  # the source's dtype, not packed

    ids = torch.tensor([IDS])
    loaded = load_model(case, engine="float")
    with torch.no_grad():
        expected = theirs(ids).logits
        assert max_apart(loaded.model(ids), expected) <= TOLERANCE
        greedy = theirs.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(IDS):].tolist()
        chose = theirs(torch.tensor([IDS + greedy[:-1]])).logits[0, len(IDS) - 1:]
    assert same_continuation(list(generate(loaded.model, IDS, 16)), chose, greedy)
    if case == "llama3":  # the scaling matters here: plain RoPE is far from it
        plain = type(theirs)(type(theirs.config)(**{**theirs.config.to_dict(),
                                                    "rope_parameters": None}))
        plain.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            assert max_apart(plain.eval()(ids).logits, expected) > 100 * TOLERANCE

    invoke("export", case, "--format", "hf", "--out", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["hidden_act"]) == \
        (["LlamaForCausalLM"], "llama", "silu")
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] == model["tie_word_embeddings"]
    back = optional("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert max_apart(back.eval()(ids).logits, expected) <= TOLERANCE


def test_chat_eval_and_status_take_an_imported_llama(sources, bitnet_home, tmp_path):
    folder = sources["untied"][0]
    invoke("import", folder, "--name", "llama")
    status = " ".join(invoke("status", "llama").stdout.split())
    assert f"from {folder.resolve()}, llama layout, full-precision weights" in status
    result = invoke("chat", "llama", "--prompt", "Once upon a time", "--max-new-tokens", "4",
                    "--temperature", "0")
    assert "float engine" in result.stderr
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join("the cat sat on the mat and the dog ran " * 20 for _ in range(50)))
    report = json.loads(invoke("eval", "llama", "--data", text, "--json").stdout)
    assert report["engine"] == "float" and report["metrics"]["loss"] > 0
    for fmt in ("hf-packed", "gguf"):
        result = invoke("export", "llama", "--format", fmt, "--out", tmp_path / fmt, code=1)
        assert "is a --quant none (full-precision) model" in result.output
        assert result.output.count("\n") == 1 and not (tmp_path / fmt).exists()


def test_a_config_without_architectures_reads_as_its_model_type(sources, bitnet_home, tmp_path):
    folder = shutil.copytree(sources["tied"][0], tmp_path / "source")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    invoke("import", folder, "--name", "typed")
    about = json.loads((bitnet_home / "runs" / "typed" / "config.json").read_text())["imported"]
    assert about["layout"] == "llama" and about["quantization"] == "none"


def edit(**changes):
    def damage(folder):
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return damage


def tensors(change):
    def damage(folder):
        weights = folder / "model.safetensors"
        state = load_file(str(weights))
        change(state)
        save_file(state, str(weights))
    return damage


def only_a_pickle(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


REFUSED = {
    "attention bias": (edit(attention_bias=True), "attention_bias True; bitnet's models have no "
                                                  "biases on q/k/v/o_proj"),
    "mlp bias": (edit(mlp_bias=True), "mlp_bias True"),
    "a head_dim of its own": (edit(head_dim=32), "head_dim 32 is not hidden_size / "
                                                 "num_attention_heads (16)"),
    "linear RoPE": (edit(rope_parameters={"rope_type": "linear", "factor": 2.0}),
                    "rope_parameters has rope_type 'linear'; bitnet computes plain RoPE "
                    "(rope_type default) and Llama 3's (llama3)"),
    "dynamic RoPE, legacy key": (edit(rope_scaling={"type": "dynamic", "factor": 2.0}),
                                 "rope_scaling has rope_type 'dynamic'"),
    "yarn": (edit(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    "llama3 without a factor": (edit(rope_parameters={**LLAMA3, "factor": None}),
                                "rope_type llama3 has no factor"),
    "llama3 upside down": (edit(rope_parameters={**LLAMA3, "high_freq_factor": 0.5}),
                           "high_freq_factor must be above its low_freq_factor"),
    "gelu": (edit(hidden_act="gelu"), "hidden_act 'gelu'"),
    "quantized": (edit(quantization_config={"quant_method": "gptq", "bits": 4}),
                  "quantization 'gptq'; bitnet imports a Llama's full-precision weights"),
    "Qwen2": (edit(architectures=["Qwen2ForCausalLM"]),
              "Qwen2ForCausalLM computes biases on q_proj, k_proj and v_proj"),
    "Qwen3": (edit(architectures=["Qwen3ForCausalLM"], head_dim=32),
              "Qwen3ForCausalLM computes RMSNorms on the queries and keys (q_norm, k_norm), and "
              "head_dim 32 (not hidden_size / num_attention_heads, 16)"),
    "Mistral": (edit(architectures=["MistralForCausalLM"]), "sliding-window attention"),
    "Gemma": (edit(architectures=["GemmaForCausalLM"]), "GemmaForCausalLM computes a GELU gate"),
    "unknown": (edit(architectures=["GPT2LMHeadModel"]),
                "architecture ['GPT2LMHeadModel'] is not one bitnet imports"),
    "only a pickle": (only_a_pickle, "a pickle file, which bitnet never loads"),
    "a bias tensor": (tensors(lambda s: s.update({"model.layers.0.self_attn.q_proj.bias":
                                                  torch.zeros(64)})),
                      "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
    "no lm_head": (tensors(lambda s: s.pop("lm_head.weight")), "'lm_head.weight' is missing"),
    "wrong shape": (tensors(lambda s: s.update({"model.norm.weight": torch.ones(3)})),
                    "has shape [3], the config says [64]"),
    "uint8 weights": (tensors(lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(
        128, 64, dtype=torch.uint8)})), "is U8; weights must be F32, F16 or BF16\n"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_bitnet_does_not_compute_is_one_line_and_no_run(sources, bitnet_home, tmp_path,
                                                             case):
    damage, message = REFUSED[case]
    folder = shutil.copytree(sources["untied"][0], tmp_path / "source")
    damage(folder)
    result = invoke("import", folder, code=1)
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert not (bitnet_home / "runs").exists() or not any((bitnet_home / "runs").iterdir())
