"""`bitnet import` of a damaged or hostile source: every case is one line, exit 1, no run and
no leftovers, and ends (no FIFO read that blocks, no string of gigabytes, no endless template).
Then what the released files say and bitnet now reads right: defaults of a config that leaves
fields out, a null eos in generation_config.json, the source's sampling defaults in chat."""

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from bitnet_cli.config.sampling import stored_sampling
from bitnet_cli.errors import BitnetError
from bitnet_cli.use.import_source import read_source
from tests.cli import invoke, optional
from tests.test_import import LLAMA3_TEMPLATE, SHAPE, bitnet_quantization, write_source

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)

# Where a render's memory is capped (RLIMIT_AS): elsewhere these would take it all.
LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's RLIMIT_AS")
GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [3]}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small valid source, as 2B4T's files are: latent weights, a tokenizer.json, a chat
    template, a generation_config.json that samples."""
    transformers = optional("transformers")
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(transformers.BitNetConfig(
        hidden_act="relu2", rope_theta=500000.0, tie_word_embeddings=True, **SHAPE))
    folder = write_source(tmp_path_factory.mktemp("good") / "source", model,
                          bitnet_quantization("online"))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA3_TEMPLATE}))
    return folder


CONFIG = "config.json"


def edit(name, **changes):
    """Set JSON fields of one of the source's files."""
    def damage(folder):
        path = folder / name
        data = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**data, **changes}))
    return damage


def config_eos(value):
    """config.json's eos_token_id, which a null one in generation_config.json leaves in force."""
    def damage(folder):
        edit("generation_config.json", eos_token_id=None)(folder)
        edit(CONFIG, eos_token_id=value)(folder)
    return damage


def write(name, text):
    def damage(folder):
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_text(text)
    return damage


def template(text):
    return edit("tokenizer_config.json", chat_template=text)


def replaced(name, make):
    """`name` replaced by what make(path) puts there (a link, a FIFO, a folder)."""
    def damage(folder):
        (folder / name).unlink(missing_ok=True)
        make(folder / name)
    return damage


def sparse(size):
    """A file of `size` bytes that takes no disk."""
    def make(path):
        with open(path, "wb") as f:
            f.truncate(size)
    return make


def far_token(added):
    """A token at id 600 (the model has 512), in the vocabulary, and added as special: the
    tokenizer still counts 321 tokens."""
    def damage(folder):
        data = json.loads((folder / "tokenizer.json").read_text())
        data["model"]["vocab"]["<|far|>"] = 600
        if added:
            data["added_tokens"].append({"id": 600, "content": "<|far|>", "single_word": False,
                                         "lstrip": False, "rstrip": False, "normalized": False,
                                         "special": True})
        (folder / "tokenizer.json").write_text(json.dumps(data))
    return damage


def sentencepiece_only(content):
    def damage(folder):
        optional("sentencepiece")
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer.model").write_bytes(content)
    return damage


def weights_fifo(folder):
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    os.mkfifo(folder / "model.safetensors")


def nested(depth):
    return "[" * depth + "]" * depth


HOSTILE = [
    # RoPE other than the plain one, in each place config.json may say it
    ("rope_scaling linear", edit(CONFIG, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "rope_scaling has rope_type 'linear'; bitnet computes plain RoPE"),
    ("rope_scaling dynamic, legacy key", edit(CONFIG, rope_scaling={"type": "dynamic",
                                                                    "factor": 2.0}),
     "rope_type 'dynamic'"),
    ("rope_parameters yarn", edit(CONFIG, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                           "rope_theta": 500000.0}),
     "rope_parameters has rope_type 'yarn'"),
    ("rope_parameters llama3", edit(CONFIG, rope_parameters={"rope_type": "llama3",
                                                             "factor": 8.0}), "'llama3'"),
    ("rope_scaling longrope", edit(CONFIG, rope_scaling={"rope_type": "longrope"}),
     "'longrope'"),
    ("rope_parameters per layer", edit(CONFIG, rope_parameters={
        "full_attention": {"rope_type": "default"}}), "holds RoPE per layer type"),
    ("rope_parameters text", edit(CONFIG, rope_parameters="default"),
     "rope_parameters must be an object (or null), got 'default'"),
    ("rope_scaling number", edit(CONFIG, rope_scaling=2), "rope_scaling must be an object"),
    ("partial rotary", edit(CONFIG, partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    # transformers' BitNet quantization options bitnet does not compute
    ("use_rms_norm", edit(CONFIG, quantization_config={**bitnet_quantization("online"),
                                                       "use_rms_norm": True}),
     "quantization_config.use_rms_norm True; bitnet reads false only"),
    ("use_rms_norm text", edit(CONFIG, quantization_config={**bitnet_quantization("online"),
                                                            "use_rms_norm": "yes"}),
     "use_rms_norm 'yes'"),
    ("modules not converted", edit(CONFIG, quantization_config={
        **bitnet_quantization("online"), "modules_to_not_convert": ["model.layers.0.mlp"]}),
     "modules_to_not_convert ['model.layers.0.mlp']"),
    ("quantization text", edit(CONFIG, quantization_config="bitnet"),
     "quantization_config must be an object, got 'bitnet'"),
    ("quantization list", edit(CONFIG, quantization_config=["bitnet"]),
     "quantization_config must be an object"),
    ("quantization mode list", edit(CONFIG, quantization_config={
        "quant_method": "bitnet", "quantization_mode": ["online"]}), "is not online or offline"),
    # every field of config.json in its JSON type
    ("architectures nested", edit(CONFIG, architectures=[["BitNetForCausalLM"]]),
     "architecture [['BitNetForCausalLM']] is not one bitnet imports"),
    ("architectures text", edit(CONFIG, architectures="BitNetForCausalLM"),
     "is not one bitnet imports"),
    ("eos float", config_eos(1.5), "eos_token_id 1.5 is not a token id"),
    ("eos true", config_eos(True), "eos_token_id True is not a token id"),
    ("eos past vocab", config_eos([3, 512]), "eos_token_id [3, 512]"),
    ("eos a list of lists", config_eos([[3]]), "eos_token_id [[3]]"),
    ("generation eos text", edit("generation_config.json", eos_token_id="</s>"),
     "eos_token_id '</s>' is not a token id"),
    ("vocab_size text", edit(CONFIG, vocab_size="512"), "vocab_size must be a whole number"),
    ("hidden_size float", edit(CONFIG, hidden_size=256.5), "hidden_size must be a whole number"),
    ("layers bool", edit(CONFIG, num_hidden_layers=True), "num_hidden_layers must be a whole"),
    ("layers huge", edit(CONFIG, num_hidden_layers=10**12), "num_hidden_layers must be a whole"),
    ("context float", edit(CONFIG, max_position_embeddings=1e30), "max_position_embeddings"),
    ("eps text", edit(CONFIG, rms_norm_eps="1e-5"), "rms_norm_eps must be a positive finite"),
    ("theta NaN", edit(CONFIG, rope_theta=float("nan"), rope_parameters=None), "rope_theta must be a positive finite"),
    ("theta in rope_parameters text", edit(CONFIG, rope_parameters={"rope_type": "default",
                                                                    "rope_theta": "big"}),
     "rope_theta must be a positive finite number, got 'big'"),
    ("tied text", edit(CONFIG, tie_word_embeddings="false"), "tie_word_embeddings must be true"),
    ("hidden_act list", edit(CONFIG, hidden_act=["relu2"]), "hidden_act ['relu2']"),
    ("head_dim text", edit(CONFIG, head_dim="64"), "head_dim '64' is not hidden_size"),
    ("huge integer", write(CONFIG, '{"vocab_size": ' + "9" * 5000 + "}"), "cannot be read"),
    # files that are not what a model folder holds, or too big to be
    ("config nested deep", write(CONFIG, nested(200_000)), "nests deeper than a model's file"),
    ("generation nested deep", write("generation_config.json", nested(200_000)), "nests deeper"),
    ("config a link to /dev/zero", replaced(CONFIG, lambda p: p.symlink_to("/dev/zero")),
     "config.json is not a regular file"),
    ("config a FIFO", replaced(CONFIG, os.mkfifo), "config.json is not a regular file"),
    ("config a folder", replaced(CONFIG, Path.mkdir), "config.json is not a regular file"),
    ("config a dangling link", replaced(CONFIG, lambda p: p.symlink_to(p.parent / "nowhere")),
     "config.json cannot be read"),
    ("generation a FIFO", replaced("generation_config.json", os.mkfifo), "is not a regular file"),
    ("tokenizer_config a FIFO", replaced("tokenizer_config.json", os.mkfifo),
     "is not a regular file"),
    ("tokenizer.json a FIFO", replaced("tokenizer.json", os.mkfifo), "is not a regular file"),
    ("tokenizer.json /dev/zero", replaced("tokenizer.json", lambda p: p.symlink_to("/dev/zero")),
     "is not a regular file"),
    ("chat_template.jinja a FIFO", replaced("chat_template.jinja", os.mkfifo),
     "is not a regular file"),
    ("special_tokens_map a FIFO", replaced("special_tokens_map.json", os.mkfifo),
     "is not a regular file"),
    ("weights a FIFO", weights_fifo, "model.safetensors is not a regular file"),
    ("config 20 MB", replaced(CONFIG, sparse(20 << 20)), "is over 16 MB"),
    ("tokenizer_config 20 MB", replaced("tokenizer_config.json", sparse(20 << 20)),
     "is over 16 MB"),
    ("tokenizer.json 200 MB", replaced("tokenizer.json", sparse(200 << 20)), "is over 100 MB"),
    ("config a list", write(CONFIG, "[1, 2]"), "config.json is not a JSON object"),
    ("tokenizer_config not JSON", write("tokenizer_config.json", "{"), "cannot be read"),
    ("tokenizer.json not JSON", write("tokenizer.json", "{"), "tokenizer.json cannot be read"),
    # the tokenizer
    ("an added token past the vocabulary", far_token(added=True),
     "has token '<|far|>' at id 600, past the model's vocabulary of 512"),
    ("a token past the vocabulary", far_token(added=False), "at id 600, past the model's"),
    ("empty tokenizer.model", sentencepiece_only(b""), "holds next to no tokens of its own"),
    ("damaged tokenizer.model", sentencepiece_only(b"not a sentencepiece model"),
     "tokenizer.model cannot be converted"),
    # the source's sampling defaults
    ("do_sample text", edit("generation_config.json", do_sample="yes"),
     "do_sample must be true or false, got 'yes'"),
    ("temperature negative", edit("generation_config.json", temperature=-1),
     "generation_config.json: temperature must be 0 (greedy) or a number"),
    ("temperature text", edit("generation_config.json", temperature="hot"), "temperature must"),
    ("top_p past 1", edit("generation_config.json", top_p=1.5), "top_p must be above 0"),
    ("top_k float", edit("generation_config.json", top_k=2.5), "top_k must be a whole number"),
    # chat templates: each bounded, and one that cannot chat refused when imported
    ("template range 10**9", template("{% for i in range(10**9) %}x{% endfor %}"),
     "Range too big"),
    ("template nested loops", template("{% for i in range(99999) %}{% for j in range(99999) %}"
                                       "{% endfor %}{% endfor %}"), "ran past 1,000,000 steps"),
    ("template recursive macro", template("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}"),
     "it nests or recurses too deeply"),
    ("template without the user", template("{% for m in messages %}{% if m.role == 'assistant'"
                                           " %}{{ m.content }}{% endif %}{% endfor %}"),
     "leaves the user's turn out of the prompt"),
    ("template whitespace only", template("   "), "leaves the user's turn out"),
    ("template x * 10**10", template("{{ 'x' * 10**10 }}"), "a repeat 10,000,000,000 times"),
    ("template of a gigabyte", template("{% for i in range(100000) %}{{ 'y' * 10000 }}"
                                        "{% endfor %}{{ messages }}"), "its output passed"),
    pytest.param("template center 2**34", template("{{ 'x'|center(2**34) }}"), "needs more than",
                 marks=LINUX_ONLY),
    pytest.param("template doubling", template("{% set ns = namespace(s='xx') %}"
                                               "{% for i in range(60) %}{% set ns.s = ns.s ~ "
                                               "ns.s %}{% endfor %}"), "needs more than",
                 marks=LINUX_ONLY),
    ("template raises", template("{{ raise_exception('no') }}"),
     "the chat template fails on a sample conversation"),
    ("template not text", template(5), "chat_template is not text"),
    ("template list of junk", template([1]), "chat_template must be text, or a list"),
    ("template does not compile", template("{% if %}"), "does not compile"),
    ("template deeply nested", template("{{" + "(" * 20000 + "1" + ")" * 20000 + "}}"),
     "does not compile"),
    ("template too long", template("x" * 300_000), "characters; bitnet reads templates"),
    ("jinja file not UTF-8", lambda folder: (folder / "chat_template.jinja").write_bytes(b"\xff"),
     "chat_template.jinja cannot be read (it is not UTF-8 text)"),
]


@pytest.mark.parametrize("how, damage, says", HOSTILE,
                         ids=[getattr(case, "values", case)[0] for case in HOSTILE])
def test_a_hostile_source_is_one_line_and_no_run(good, bitnet_home, tmp_path, how, damage, says):
    folder = shutil.copytree(good, tmp_path / "source")
    damage(folder)
    with unblocked_fifos(folder):
        result = invoke("import", folder, "--name", "hostile", code=1)
    assert says in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    runs = bitnet_home / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


class unblocked_fifos:
    """Should the import open a FIFO as a file and wait on it, a writer opens its other end and
    closes it: the read ends (and the test fails on its message) instead of hanging."""

    def __init__(self, folder):
        self.writers = {path: threading.Thread(target=lambda p=path: os.close(
            os.open(p, os.O_WRONLY)), daemon=True)  # the open waits for a reader
            for path in folder.iterdir() if path.is_fifo()}

    def __enter__(self):
        for writer in self.writers.values():
            writer.start()

    def __exit__(self, *exc):
        for path, writer in self.writers.items():  # a writer no reader met is let go
            reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            writer.join()
            os.close(reader)


@pytest.mark.parametrize("source", ["here/bar", "./nothing", "../nothing/x", "/no/such/folder",
                                    "~/no-such-folder-bitnet"])
def test_a_local_path_that_does_not_exist_is_not_fetched(bitnet_home, tmp_path, monkeypatch,
                                                         source):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path)
    result = invoke("import", source, code=1)
    assert f"{source} does not exist (a local path" in result.output, result.output
    assert result.output.count("\n") == 1


def test_an_owner_that_is_no_folder_here_is_a_hub_id(bitnet_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("import", "nobody-here/model", code=1)  # offline in tests: the hub's error
    assert "cannot download nobody-here/model from the Hugging Face hub" in result.output


def test_a_good_source_reads_whole(good, tmp_path, monkeypatch):
    monkeypatch.chdir(good.parent)
    imported = read_source(Path(good.name))
    assert imported.about["source"] == str(good.resolve())
    assert imported.stop_ids == [3] and imported.config.activation == "relu2"
    assert imported.chat is not None
    # transformers samples 2B4T's way with its top_k default, 50, as well
    assert imported.sampling == {"temperature": 0.6, "top_k": 50, "top_p": 0.9}


@pytest.mark.parametrize("architecture, model_type, activation, eps",
                         [("BitNetForCausalLM", "bitnet", "relu2", 1e-5),
                          ("BitnetForCausalLM", "llama", "silu", 1e-6)])
def test_a_config_that_leaves_fields_out_reads_as_transformers(good, tmp_path, architecture,
                                                               model_type, activation, eps):
    """BitNetConfig's defaults for the bitnet layout, LlamaConfig's for 1bitLLM's."""
    folder = shutil.copytree(good, tmp_path / "source")
    config = json.loads((folder / "config.json").read_text())
    for field in ("hidden_act", "rms_norm_eps", "rope_parameters", "max_position_embeddings"):
        config.pop(field, None)
    config.update(architectures=[architecture], model_type=model_type, hidden_act=None)
    (folder / "config.json").write_text(json.dumps(config))
    model = read_source(folder).config
    assert (model.activation, model.rms_norm_eps, model.max_position_embeddings) == \
        (activation, eps, 2048)
    assert model.rope_theta == (500000.0 if model_type == "bitnet" else 10000.0)


def test_a_null_eos_in_generation_config_falls_back_to_config(good, tmp_path):
    folder = shutil.copytree(good, tmp_path / "source")
    edit("generation_config.json", eos_token_id=None)(folder)
    edit("config.json", eos_token_id=7)(folder)
    assert read_source(folder).stop_ids == [7]
    edit("config.json", eos_token_id=None)(folder)
    assert read_source(folder).stop_ids == []


def test_an_empty_template_is_no_template(good, tmp_path):
    """transformers takes "" as no chat template: the model imports as a plain text one."""
    folder = shutil.copytree(good, tmp_path / "source")
    template("")(folder)
    assert read_source(folder).chat is None


@pytest.mark.parametrize("generation, sampling", [
    ({"do_sample": False, "temperature": 0.6}, {}), ({}, {}),
    ({"do_sample": True}, {"temperature": 1.0, "top_k": 50}),
    ({"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}, {"temperature": 0.7}),
    ({"do_sample": True, "top_k": 100000}, {"temperature": 1.0, "top_k": 512})])
def test_the_sources_sampling_is_transformers(good, tmp_path, generation, sampling):
    folder = shutil.copytree(good, tmp_path / "source")
    write("generation_config.json", json.dumps(generation))(folder)
    assert read_source(folder).sampling == sampling


def test_stored_sampling_is_checked():
    assert stored_sampling(None, "t") == {}
    assert stored_sampling({"top_p": 0.9, "temperature": 0.6}, "t") == {"temperature": 0.6,
                                                                       "top_p": 0.9}
    for bad in ("hot", [0.6], {"temperature": -1}, {"top_k": 0}, {"top_k": 2.0},
                {"top_p": 0}, {"seed": 1}, {"temperature": True}):
        with pytest.raises(BitnetError, match="t: sampling must hold"):
            stored_sampling(bad, "t")


def test_chat_samples_as_the_model_says_unless_told(good, bitnet_home, monkeypatch):
    from bitnet_cli.use.conversation import Sampling
    invoke("import", good, "--name", "sampled")
    trainer = next((bitnet_home / "runs" / "sampled" / "checkpoints").glob("step_*")) \
        / "trainer.json"
    # the import stored the source's sampling, as transformers' generate() reads it
    assert json.loads(trainer.read_text())["sampling"] == {"temperature": 0.6, "top_k": 50,
                                                           "top_p": 0.9}
    used = []
    real_validate = Sampling.validate
    monkeypatch.setattr(Sampling, "validate", lambda self, vocab: used.append(
        (self.temperature, self.top_k, self.top_p)) or real_validate(self, vocab))
    chat = ["chat", "sampled", "--prompt", "the cat", "--max-new-tokens", "2", "--seed", "0"]
    notes = [line for line in invoke(*chat).stderr.splitlines() if line.startswith("sampling:")]
    assert notes == ["sampling: temperature 0.6, top-k 50, top-p 0.9 (the model's defaults; "
                     "--temperature 0 for greedy)"]
    assert used[-1] == (0.6, 50, 0.9)
    result = invoke(*chat, "--temperature", "0.3", "--top-p", "0.5")
    assert "sampling: temperature 0.3, top-k 50, top-p 0.5 (top-k from the model; " \
        in result.stderr
    assert used[-1] == (0.3, 50, 0.5)
    result = invoke(*chat, "--temperature", "0")
    assert "sampling:" not in result.stderr and used[-1][0] == 0
    data = {**json.loads(trainer.read_text()), "sampling": {"temperature": "hot"}}
    trainer.write_text(json.dumps(data))
    result = invoke(*chat, code=1)
    assert "sampling must hold temperature" in result.output
    assert result.output.count("\n") == 1
