"""A full-precision Llama made by transformers becomes a ternary model here: imported, converted
with itself as the teacher, stopped with kill -9 and resumed onto the same bytes, and exported as
packed codes that transformers loads and computes as bitnet does."""

import json
import subprocess
import sys

import torch

from bitnet_cli.data.stories import write_stories
from bitnet_cli.use.loading import load_model
from tests.cli import invoke, needs_torch_compile, optional
from tests.contract import assert_greedy_agree
from tests.test_import_llama import IDS, sources  # noqa: F401 (the fixture)
from tests.test_resume import final_weights, wait_for_step

STEPS = 12


def convert(data, *more):
    return ["train", "tinystories", "--size", "tiny", "--from", "llama", "--quant", "ternary",
            "--teacher", "llama", "--data", data, "--batch-size", "4", "--seq-len", "64",
            "--steps", str(STEPS), "--save-every", "4", "--eval-every", "6", "--no-compile",
            *more]


def test_a_llama_converts_distils_resumes_and_exports(sources, bitnet_home, tmp_path):  # noqa: F811
    invoke("import", sources["untied"][0], "--name", "llama")  # GQA, its own head
    data = write_stories(tmp_path / "data", 300)
    invoke(*convert(data, "--distill-layer", "1", "--name", "whole"))
    config = json.loads((bitnet_home / "runs" / "whole" / "config.json").read_text())
    assert (config["model"]["quant"], config["model"]["sub_norms"]) == ("ternary", True)
    assert config["model"]["activation"] == "silu" and not config["model"]["tie_word_embeddings"]

    proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", *map(str, convert(
        data, "--distill-layer", "1", "--name", "killed"))], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    wait_for_step(bitnet_home, "killed", 5, proc)  # past the checkpoint at 4
    proc.kill()
    proc.wait()
    invoke("resume", "killed")
    assert final_weights(bitnet_home, "killed", STEPS) == final_weights(bitnet_home, "whole",
                                                                         STEPS)

    invoke("export", "whole", "--format", "hf-packed", "--out", tmp_path / "packed")
    needs_torch_compile()  # transformers' packed-weight loader compiles
    theirs = optional("transformers").AutoModelForCausalLM.from_pretrained(
        tmp_path / "packed", dtype=torch.float32)
    ours = load_model("whole", engine="float")
    with torch.no_grad():
        assert_greedy_agree(ours.model(torch.tensor([IDS])), theirs(torch.tensor([IDS])).logits)
