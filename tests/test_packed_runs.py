"""Imported ternary models at their 2-bit size: the run stores the release's packed codes (the
layout nn/packed_weights.py documents), every engine computes the model those codes are (the
same as the latent weights they stand for), the 2bit engine never makes a float32 copy of a
layer, the float engine keeps one copy, export and train --from take the run, and a damaged
packed checkpoint is one line."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bitnet_cli.nn.bitlinear import BitLinear, QuantizedLinear, pack_ternary, unpack_ternary
from bitnet_cli.nn.model import generate
from bitnet_cli.nn.packed_weights import ModelWeights
from bitnet_cli.store.checkpoint import StoredTensors, step_dir_name
from bitnet_cli.use.loading import load_model
from tests.cli import invoke, optional
from tests.contract import assert_greedy_agree, same_continuation
from tests.test_import import IDS, sources  # noqa: F401  (the fixture: each layout, built offline)

pytestmark = pytest.mark.engines

LAYOUTS = ["2b4t-bf16", "2b4t-packed", "bitlinear-packed", "1bitllm"]


def checkpoint_file(home, run):
    return home / "runs" / run / "checkpoints" / step_dir_name(0) / "model.safetensors"


def header(path):
    with safe_open(str(path), "pt") as f:
        return {name: f.get_slice(name).get_dtype() for name in f.keys()}


def latent_twin(home, run, twin):
    """A copy of an imported run whose checkpoint holds the latent float32 weights the packed
    codes stand for, as imports stored them before runs kept their codes."""
    shutil.copytree(home / "runs" / run, home / "runs" / twin)
    weights = ModelWeights(StoredTensors(checkpoint_file(home, run)))
    save_file({name: weights[name].float().contiguous() for name in weights},
              str(checkpoint_file(home, twin)), metadata={"format": "pt"})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_imported_run_keeps_its_codes_and_computes_the_same_model(sources, bitnet_home,  # noqa: F811
                                                                     layout):
    folder, _ = sources[layout]
    invoke("import", folder, "--name", "packed")
    stored = header(checkpoint_file(bitnet_home, "packed"))
    source = {}
    for file in folder.glob("*.safetensors"):
        source.update(header(file))
    projections = [name for name in stored if name.endswith("_proj.weight")]
    assert projections and all(stored[name] == "U8" for name in projections)
    assert all(stored[name + "_scale"] == "F32" for name in projections)
    # the other tensors as the source has them (bf16 stays bf16)
    assert stored["model.norm.weight"] == source["model.norm.weight"]
    if layout == "2b4t-packed":  # about the source's size
        size = checkpoint_file(bitnet_home, "packed").stat().st_size
        assert size <= 1.1 * sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    latent_twin(bitnet_home, "packed", "latent")
    ids = torch.tensor([IDS])
    for engine in ("2bit", "int8", "float"):
        ours, before = load_model("packed", engine=engine), load_model("latent", engine=engine)
        with torch.no_grad():
            expected = before.model(ids)
            assert_greedy_agree(ours.model(ids), expected)
            tokens = list(generate(before.model, IDS, 24))
            chose = before.model(torch.tensor([IDS + tokens[:-1]]))[0, len(IDS) - 1:]
        assert same_continuation(list(generate(ours.model, IDS, 24)), chose, tokens), engine


def test_the_engines_take_codes_without_a_float32_copy(sources, bitnet_home, monkeypatch):  # noqa: F811
    invoke("import", sources["2b4t-packed"][0], "--name", "packed")

    def no_latent(self, name):
        assert name not in self.packed, f"{name}: a float32 copy of a packed layer was made"
        return self.stored[name]
    with monkeypatch.context() as patch:
        patch.setattr(ModelWeights, "__getitem__", no_latent)
        for engine in ("2bit", "int8", "float"):
            model = load_model("packed", engine=engine).model
            assert not any(isinstance(m, BitLinear) for m in model.modules())
    # the float engine holds each layer once: its codes and their scale, nothing beside them
    model = load_model("packed", engine="float").model
    floats = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(floats) == 7 * model.config.num_hidden_layers
    assert all(sum(b.numel() for b in m.buffers()) == m.in_features * m.out_features + 1
               and not list(m.parameters()) for m in floats)


def test_a_packed_run_exports_to_every_format(sources, bitnet_home, tmp_path):  # noqa: F811
    transformers = optional("transformers")
    invoke("import", sources["2b4t-packed"][0], "--name", "packed")
    ours = load_model("packed")
    with torch.no_grad():
        expected = ours.model(torch.tensor([IDS]))
    for fmt in ("hf", "hf-packed"):
        invoke("export", "packed", "--format", fmt, "--out", tmp_path / fmt)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / fmt,
                                                                   dtype=torch.float32)
        with torch.no_grad():
            assert_greedy_agree(theirs(torch.tensor([IDS])).logits, expected)
    # hf-packed writes the run's own codes back
    ours_codes = load_file(str(checkpoint_file(bitnet_home, "packed")))
    exported = load_file(str(tmp_path / "hf-packed" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(unpack_ternary(exported[name]), unpack_ternary(ours_codes[name]))
    gguf = optional("gguf")
    invoke("export", "packed", "--format", "gguf", "--out", tmp_path / "gguf")
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf"))
    assert any(t.name == "blk.0.ffn_down.weight" for t in reader.tensors)


def damage(path, how):
    tensors = load_file(str(path))
    name = "model.layers.0.mlp.up_proj.weight"
    if how == "code 3":
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] |= 3
    elif how in ("zero scale", "nan scale"):
        tensors[name + "_scale"] = torch.tensor([0.0 if how == "zero scale" else float("nan")])
    elif how == "no scale":
        del tensors[name + "_scale"]
    elif how == "uint8 norm":
        tensors["model.norm.weight"] = torch.zeros(tensors["model.norm.weight"].shape,
                                                   dtype=torch.uint8)
    save_file(tensors, str(path))


@pytest.mark.parametrize("how,engine", [("code 3", "2bit"), ("code 3", "int8"), ("code 3", "float"),
                                        ("zero scale", "2bit"), ("nan scale", "int8"),
                                        ("no scale", "2bit"), ("uint8 norm", "float")])
def test_a_damaged_packed_checkpoint_is_one_line(sources, bitnet_home, how, engine):  # noqa: F811
    invoke("import", sources["2b4t-packed"][0], "--name", "packed")
    damage(checkpoint_file(bitnet_home, "packed"), how)
    result = invoke("chat", "packed", "--prompt", "Once", "--engine", engine, code=1)
    assert "Traceback" not in result.output + result.stderr
    assert len((result.stdout + result.stderr).strip().splitlines()) == 1
    assert "model.safetensors" in result.stdout + result.stderr


def test_packed_codes_survive_the_run_format(tmp_path):
    """The layout documented in the README: byte row j holds rows j, j + out/4, ... bits 2b."""
    codes = torch.randint(-1, 2, (8, 5), dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.shape == (2, 5)
    for row in range(8):
        byte_row, block = row % 2, row // 2
        assert torch.equal(((packed[byte_row] >> (2 * block)) & 3).to(torch.int8) - 1, codes[row])
    save_file({"model.layers.0.mlp.up_proj.weight": packed,
               "model.layers.0.mlp.up_proj.weight_scale": torch.tensor([0.5])}, tmp_path / "x")
    weights = ModelWeights(StoredTensors(tmp_path / "x"))
    assert weights.shapes["model.layers.0.mlp.up_proj.weight"] == (8, 5)
    latent = weights["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(latent.sign().to(torch.int8), codes)
    assert latent.abs().mean().item() == pytest.approx(0.5)
    assert json.dumps(weights.shapes["model.layers.0.mlp.up_proj.weight"])
