"""`bitnet import`: released BitNet layouts, written here offline by transformers' own classes,
become runs whose logits are transformers' on the same ids, whose greedy continuations are
transformers', and which chat takes; a bad source is one line and leaves no run behind."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet_cli.nn.bitlinear import ternary_codes_and_scale
from bitnet_cli.nn.half_head import HalfEmbedding, HalfHead
from bitnet_cli.nn.model import generate
from tests.contract import assert_greedy_agree, same_continuation
from bitnet_cli.use.loading import load_model
from tests.cli import invoke, needs_torch_compile, optional
from tests.models import story_tokenizer

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)

IDS = [5, 17, 230, 41, 99, 3, 250, 12, 77, 140, 8, 301, 64, 199, 27, 310]
SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5, eos_token_id=3)


def bitnet_quantization(mode, linear="autobitlinear"):
    return {"quant_method": "bitnet", "linear_class": linear, "quantization_mode": mode}


def write_source(folder, model, quantization=None, tensors=None, config_changes=None):
    """A source folder as transformers writes it, with a tokenizer.json; `tensors` replace the
    saved weights (packed ones), `config_changes` edit config.json."""
    model.save_pretrained(folder)
    story_tokenizer().save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "config.json").read_text())
    if quantization:
        config["quantization_config"] = quantization
    config.update(config_changes or {})
    (folder / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        for old in folder.glob("*.safetensors"):
            old.unlink()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def packed(state, divide=False):
    """The projections as 2B4T stores them: transformers' pack_weights and a weight_scale."""
    from transformers.integrations.bitnet import pack_weights
    tensors = {k: v.clone() for k, v in state.items() if k != "lm_head.weight"}
    for name in [k for k in tensors if k.endswith("_proj.weight")]:
        codes, scale = ternary_codes_and_scale(tensors[name])
        tensors[name] = pack_weights(codes.float())
        tensors[name[:-len("weight")] + "weight_scale"] = (1 / scale if divide else scale).reshape(1)
    return tensors


@pytest.fixture(scope="session")  # test_packed_runs takes them too: built once
def sources(tmp_path_factory):
    """name -> (source folder, the model transformers loads from it in float32)."""
    transformers = optional("transformers")
    needs_torch_compile()  # transformers unpacks packed weights with torch.compile
    root = tmp_path_factory.mktemp("sources")
    made = {}

    def plain(activation="relu2", tied=True):
        torch.manual_seed(0)
        config = transformers.BitNetConfig(hidden_act=activation, rope_theta=500000.0,
                                           tie_word_embeddings=tied, **SHAPE)
        return transformers.BitNetForCausalLM(config)

    model = plain()
    made["2b4t-bf16"] = write_source(root / "bf16", model.to(torch.bfloat16),
                                     bitnet_quantization("online"))
    model = plain()
    made["2b4t-packed"] = write_source(root / "packed", model, bitnet_quantization("offline"),
                                       packed(model.state_dict()))
    made["bitlinear-packed"] = write_source(root / "bitlinear", model,
                                            bitnet_quantization("offline", "bitlinear"),
                                            packed(model.state_dict(), divide=True))
    # 1bitLLM: a Llama-architecture file with its own names for the sub-norms, SiLU, an
    # untied head; transformers' BitNet computes the same model from the bitnet names.
    model = plain("silu", tied=False)
    reference = write_source(root / "1bitllm-as-bitnet", model, bitnet_quantization("online"))
    renamed = {k.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
                .replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm"): v
               for k, v in load_file(str(next(reference.glob("*.safetensors")))).items()}
    made["1bitllm"] = write_source(root / "1bitllm", model, None, renamed,
                                   {"architectures": ["BitnetForCausalLM"], "model_type": "llama",
                                    "rope_theta": 500000.0})
    theirs = {name: (folder, transformers.AutoModelForCausalLM.from_pretrained(
        reference if name == "1bitllm" else folder, dtype=torch.float32).eval())
        for name, folder in made.items()}
    return theirs


@pytest.mark.parametrize("layout", ["2b4t-bf16", "2b4t-packed", "bitlinear-packed", "1bitllm"])
def test_an_imported_model_computes_what_transformers_does(sources, bitnet_home, layout):
    folder, theirs = sources[layout]
    result = invoke("import", folder, "--name", layout)
    assert f"as run {layout}" in result.stdout
    ids = torch.tensor([IDS])
    with torch.no_grad():
        expected = theirs(ids).logits
        exact = copy.deepcopy(theirs).double()(ids).logits
        greedy = theirs.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(IDS):].tolist()
    # The float engine is transformers' float32 maths. The CPU default (2bit) and the int8
    # engine sum exactly in integers where floats round, so they are compared with transformers
    # in float64: the model's exact value. Each keeps the engines' contract with its reference
    # (measured: within 5e-7 on this suite's sources; on the bf16 source transformers' own
    # float32 is 2% from float64, where one activation within float rounding of a quantization
    # boundary takes the other code), and its greedy continuation is transformers'.
    with torch.no_grad():
        chose = theirs(torch.tensor([IDS + greedy[:-1]])).logits[0, len(IDS) - 1:]
    for engine, reference in (("float", expected), (None, exact), ("int8", exact)):
        loaded = load_model(layout, engine=engine)
        with torch.no_grad():
            assert_greedy_agree(loaded.model(ids), reference)
        assert same_continuation(list(generate(loaded.model, IDS, 32)), chose, greedy), engine
    assert loaded.stop_ids == (3,)
    # bf16 weights are exact in float16: that source keeps the faster float16 head, and its
    # tied embedding reads it (no float32 copy); a float32 source keeps both in float32.
    exact_in_half = layout == "2b4t-bf16"
    assert isinstance(loaded.model.lm_head, HalfHead if exact_in_half else torch.nn.Linear)
    default = load_model(layout)
    assert isinstance(default.model.model.embed_tokens,
                      HalfEmbedding if exact_in_half else torch.nn.Embedding)


def test_a_round_trip_through_our_own_exports(short_run, bitnet_home, tmp_path):
    run = short_run("tinystories")
    ours = load_model(str(run), engine="float")
    prompt = ours.tokenizer.encode("Once upon a time").ids
    with torch.no_grad():
        expected = ours.model(torch.tensor([prompt]))
    for fmt in ("hf", "hf-packed"):
        invoke("export", run, "--format", fmt, "--out", tmp_path / fmt)
        invoke("import", tmp_path / fmt, "--name", fmt)
        back = load_model(fmt, engine="float")
        assert back.tokenizer.to_str() == ours.tokenizer.to_str()
        with torch.no_grad():
            assert_greedy_agree(back.model(torch.tensor([prompt])), expected)
            tokens = list(generate(ours.model, prompt, 32))
            chose = ours.model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
        assert same_continuation(list(generate(back.model, prompt, 32)), chose, tokens)
    result = invoke("chat", "hf-packed", "--prompt", "Once upon a time", "--max-new-tokens", "8")
    assert ", 2bit engine" in result.stderr.splitlines()[-1]
    assert json.loads((bitnet_home / "runs" / "hf" / "state.json").read_text())["status"] == "imported"


def damage(folder, how):
    """`folder` (a copy of a good source) broken one way."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    weights = next(folder.glob("*.safetensors"))
    if how == "no config":
        config_path.unlink()
    elif how == "gelu":
        config_path.write_text(json.dumps({**config, "hidden_act": "gelu"}))
    elif how == "unknown architecture":
        config_path.write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    elif how == "a .bin only":
        weights.rename(folder / "pytorch_model.bin")
    elif how in ("wrong dtype", "wrong shape", "missing tensor", "code 3"):
        tensors = load_file(str(weights))
        name = "model.layers.0.mlp.up_proj.weight"
        if how == "wrong dtype":
            tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
        elif how == "wrong shape":
            tensors["model.norm.weight"] = torch.ones(3)
        elif how == "missing tensor":
            del tensors["model.norm.weight"]
        else:
            tensors[name] = torch.full_like(tensors[name], 255)
        save_file(tensors, str(weights))
    elif how == "truncated header":
        weights.write_bytes(weights.read_bytes()[:20])
    elif how == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    elif how == "bad scale":
        tensors = load_file(str(weights))
        tensors["model.layers.0.mlp.up_proj.weight_scale"] = torch.tensor([-1.0])
        save_file(tensors, str(weights))
    return folder


BAD = {"no config": "has no config.json", "gelu": "hidden_act 'gelu'",
       "unknown architecture": "architecture ['GPT2LMHeadModel'] is not one bitnet imports",
       "a .bin only": "a pickle file, which bitnet never loads",
       "wrong dtype": "is I32", "wrong shape": "has shape [3], the config says [256]",
       "missing tensor": "'model.norm.weight' is missing", "code 3": "holds a code of 3",
       "truncated header": "cannot be read", "no tokenizer": "has no tokenizer.json",
       "bad scale": "not one positive scale"}


@pytest.mark.parametrize("how", list(BAD))
def test_a_bad_source_is_one_line_and_no_run(sources, bitnet_home, tmp_path, how):
    folder = damage(shutil.copytree(sources["2b4t-packed"][0], tmp_path / "source"), how)
    result = invoke("import", folder, code=1)
    assert BAD[how] in result.output and result.output.count("\n") == 1, result.output
    assert not (bitnet_home / "runs").exists() or not any((bitnet_home / "runs").iterdir())


def test_a_hub_id_while_offline_is_one_line(bitnet_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("import", "microsoft/bitnet-b1.58-2B-4T", code=1)
    assert "cannot download microsoft/bitnet-b1.58-2B-4T from the Hugging Face hub" in result.output
    assert result.output.count("\n") == 1 and not (bitnet_home / "runs").exists()


def test_an_existing_run_name_is_refused(sources, bitnet_home):
    invoke("import", sources["2b4t-packed"][0], "--name", "twice")
    result = invoke("import", sources["2b4t-packed"][0], "--name", "twice", code=1)
    assert "a run named 'twice' already exists" in result.output


def test_status_eval_and_resume_know_an_imported_run(sources, bitnet_home, tmp_path):
    invoke("import", sources["2b4t-packed"][0], "--name", "released")
    status = " ".join(invoke("status", "released").stdout.split())
    assert "released imported" in status and "imported from" in status
    assert "released imported" in " ".join(invoke("status").stdout.split())
    result = invoke("resume", "released", code=1)
    assert "was imported, not trained here" in result.output
    assert "no held-out text of its own" in invoke("eval", "released", code=1).output
    text = tmp_path / "text.txt"
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    text.write_text("\n\n".join(" ".join(words[(i * 7 + j * 3) % 8] for j in range(60))
                                for i in range(400)))
    report = json.loads(invoke("eval", "released", "--data", text, "--json").stdout)
    assert report["metrics"]["loss"] > 0 and report["engine"] == "2bit"
    # Its default head is float32 (a float32 source); the faster float16 one can be asked for,
    # and float32 is no error on the float engine, whose head it is anyway.
    for head in (("--head", "float16"), ("--head", "float32", "--engine", "float")):
        invoke("chat", "released", "--raw", "--prompt", "the cat", "--max-new-tokens", "4",
               "--temperature", "0", *head)


def test_status_shows_a_status_it_does_not_know_as_written(sources, bitnet_home):
    invoke("import", sources["2b4t-packed"][0], "--name", "odd")
    state = bitnet_home / "runs" / "odd" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "status": "odd[/]"}))
    assert "odd odd[/]" in " ".join(invoke("status", "odd").stdout.split())


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>"]
STRINGS = ["Once upon a time", "hello world", "  leading spaces", "tabs\tand\nnewlines",
           "naïve café", "emoji 🙂 here", "<|eot_id|> inside", "numbers 12345 67",
           "UPPER lower MiXeD", "punctuation!?.,;:", "a" * 50, "", " ", "The cat sat.",
           "Tom and Lily went to the park.", "über straße", "日本語のテキスト",
           "<|begin_of_text|>start", "end<|end_of_text|>", "x y z"]


@pytest.fixture(scope="module")
def chat_source(tmp_path_factory):
    """A 2B4T-style chat model: a byte-level BPE with Llama 3's special tokens, its chat template
    and eot as the end of a reply."""
    transformers = optional("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(STRINGS * 20 + ["the quick brown fox jumps"] * 50, trainer)
    folder = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    eot = tokenizer.token_to_id("<|eot_id|>")
    model = transformers.BitNetForCausalLM(transformers.BitNetConfig(
        hidden_act="relu2", rope_theta=500000.0, tie_word_embeddings=True,
        **{**SHAPE, "eos_token_id": eot}))
    write_source(folder, model, bitnet_quantization("online"))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}))
    return folder, eot


def test_a_chat_models_tokenizer_and_template_are_transformers(chat_source, bitnet_home):
    folder, eot = chat_source
    theirs = optional("transformers").AutoTokenizer.from_pretrained(folder)
    invoke("import", folder, "--name", "chatty")
    loaded = load_model("chatty")
    assert loaded.stop_ids == (eot,) and loaded.chat is not None
    for text in STRINGS:
        assert loaded.tokenizer.encode(text).ids == theirs(text)["input_ids"], text
    from bitnet_cli.use.conversation import ChatSession, Sampling
    session = ChatSession(loaded, Sampling(temperature=0, max_new_tokens=4))
    history = []
    for question in ("Hi there", "Tell me a story about the cat"):
        expected = theirs.apply_chat_template(history + [{"role": "user", "content": question}],
                                              add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert session.templated_prompt(question) == list(expected)
        answer = "".join(session.reply(question))
        history += [{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]
        assert session.messages == history
    raw = ChatSession(loaded, Sampling(temperature=0, max_new_tokens=4), raw=True)
    assert raw.template is None


def test_serve_reads_a_chat_models_messages_through_its_template(chat_source, bitnet_home):
    """What `bitnet serve` feeds the model for /v1/chat/completions is transformers'
    apply_chat_template of the whole conversation, and its reply stops at the model's eot."""
    from bitnet_cli.serve.prompts import Prompts
    from bitnet_cli.serve.schema import ChatRequest
    from bitnet_cli.tasks import load_experiment
    folder, eot = chat_source
    theirs = optional("transformers").AutoTokenizer.from_pretrained(folder)
    invoke("import", folder, "--name", "served")
    loaded = load_model("served")
    prompts = Prompts(loaded, load_experiment(loaded.experiment))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "A cat?"}]
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert prompts.chat(ChatRequest.model_validate({"messages": messages})) == list(expected)
    from bitnet_cli.serve.engine import Engine
    assert Engine(loaded, max_streams=1).stop_ids == (eot,)


def test_a_template_that_does_not_compile_is_one_line(chat_source, bitnet_home, tmp_path):
    folder = shutil.copytree(chat_source[0], tmp_path / "source")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config,
                                                              "chat_template": "{% if %}"}))
    result = invoke("import", folder, code=1)
    assert "the chat template does not compile" in result.output
    assert result.output.count("\n") == 1


FINE_TUNE = ["tinystories", "--size", "tiny", "--from", "base", "--steps", "40", "--batch-size",
             "8", "--seq-len", "64", "--eval-every", "20", "--save-every", "20", "--no-compile"]


def test_fine_tuning_an_imported_model(sources, bitnet_home, tmp_path):
    """train --from: the imported weights, the source's tokenizer on local text, a tenth of the
    size's peak lr; its held-out loss falls below the imported model's on that text; killed
    and resumed it ends on the same bytes; its hf-packed export is transformers' model."""
    import subprocess
    import sys
    from bitnet_cli.store.checkpoint import step_dir_name
    from tests.cli import state_step, wait_until
    invoke("import", sources["2b4t-packed"][0], "--name", "base")
    invoke("stories", tmp_path / "stories", "--stories", "600")
    data = ["--data", tmp_path / "stories"]
    before = json.loads(invoke("eval", "base", *data, "--json").stdout)["metrics"]["loss"]
    result = invoke("train", *FINE_TUNE, *data, "--name", "tuned")
    assert "stores its layers as 2-bit codes" in " ".join((result.output + result.stderr).split())
    config = json.loads((bitnet_home / "runs" / "tuned" / "config.json").read_text())
    assert config["train"]["lr"] == pytest.approx(3e-4) and config["model"]["vocab_size"] == 512
    assert config["train"]["init_from"].endswith(step_dir_name(0))
    after = json.loads(invoke("eval", "tuned", "--json").stdout)["metrics"]["loss"]
    assert after < before
    assert "fine-tuned from" in " ".join(invoke("status", "tuned").stdout.split())
    assert "was imported and has no evaluations of its own" in invoke(
        "compare", "base", "tuned", code=1).output
    assert load_model("tuned").tokenizer.to_str() == load_model("base").tokenizer.to_str()

    weights = lambda run: (bitnet_home / "runs" / run / "checkpoints" / step_dir_name(40) /  # noqa: E731
                           "model.safetensors").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", "train", *map(str, FINE_TUNE),
                             *map(str, data), "--name", "killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = bitnet_home / "runs" / "killed" / "state.json"
    wait_until(lambda: state_step(state) >= 21, "step 21", proc)
    proc.kill()
    proc.wait()
    invoke("resume", "killed")
    assert weights("killed") == weights("tuned")
    # Killed before its first save, it starts from the imported weights again.
    args = [str(a) for a in FINE_TUNE + data] + ["--save-every", "40", "--name", "early"]
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = bitnet_home / "runs" / "early" / "state.json"
    wait_until(lambda: state_step(state) >= 1, "step 1", proc)
    proc.kill()
    proc.wait()
    assert not any((bitnet_home / "runs" / "early" / "checkpoints").glob("step_*"))
    invoke("resume", "early")
    assert weights("early") == weights("tuned")

    invoke("export", "tuned", "--format", "hf-packed", "--out", tmp_path / "packed")
    needs_torch_compile()
    theirs = optional("transformers").AutoModelForCausalLM.from_pretrained(
        tmp_path / "packed", dtype=torch.float32)
    ours = load_model("tuned", engine="float")
    with torch.no_grad():
        assert_greedy_agree(ours.model(torch.tensor([IDS])), theirs(torch.tensor([IDS])).logits)


def test_a_fine_tune_that_contradicts_its_model_is_one_line(sources, bitnet_home, tmp_path):
    invoke("import", sources["2b4t-packed"][0], "--name", "base")
    result = invoke("train", *FINE_TUNE, "--quant", "none", code=1)
    assert "--quant none: the model --from is ternary" in result.output
    result = invoke("train", *FINE_TUNE, "--activation", "silu", code=1)
    assert "--activation silu" in result.output
    result = invoke("train", "arithmetic", "--from", "base", code=1)
    assert "another tokenizer than the arithmetic experiment's" in result.output
    result = invoke("train", "tinystories", "--from", "nothing-by-this-name", code=1)
    assert result.output.count("\n") == 1
    assert sorted(p.name for p in (bitnet_home / "runs").iterdir()) == ["base"]


def test_a_sentencepiece_only_tokenizer_is_converted_as_transformers_does(sources, bitnet_home,
                                                                          tmp_path):
    """1bitLLM ships a Llama sentencepiece tokenizer.model and no tokenizer.json: imported, its
    ids are transformers' fast tokenizer's."""
    optional("sentencepiece")
    import sentencepiece as spm
    transformers = optional("transformers")
    folder = shutil.copytree(sources["1bitllm"][0], tmp_path / "1bitllm")
    (folder / "tokenizer.json").unlink()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(STRINGS * 10 + ["the quick brown fox jumps over"] * 40))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=480, model_type="bpe", byte_fallback=True,
                                   minloglevel=2)
    invoke("import", folder, "--name", "sp")
    theirs = transformers.LlamaTokenizerFast.from_pretrained(folder)
    ours = load_model("sp", engine="float").tokenizer
    for text in STRINGS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert "tokenizer.model cannot be converted" in invoke("import", folder, code=1).output
