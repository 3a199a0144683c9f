"""The GPU path: what needs CUDA. Skipped without it (the reason says so); on a machine with a GPU
`python -m pytest -q -m gpu` runs just these.

What holds on CUDA: training runs in bf16 autocast and compiled; a killed run resumes onto the
same trajectory as far as CUDA's kernels allow (the same GPU, the same software: the test
measures how close, and holds it to float noise rather than to the byte); the int8 engine and
the float engine agree; chat, play and eval run on the GPU with --device cuda.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bitnet_cli.store.checkpoint import step_dir_name
from tests.cli import invoke, state_step, wait_until

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (run `pytest -m gpu` where there is one)")]

STEPS = 60
ARGS = ["simple", "--steps", str(STEPS), "--save-every", "20", "--eval-every", "30",
        "--device", "cuda", "--compile"]


def final_tensors(home, name, step=STEPS):
    return load_file(home / "runs" / name / "checkpoints" / step_dir_name(step) / "model.safetensors")


def test_bf16_compiled_training_on_cuda_learns(bitnet_home):
    out = invoke("train", *ARGS, "--name", "gpu").output
    assert "on cuda" in out and "(compiled)" in out and "note:" not in out
    status = json.loads(invoke("status", "gpu", "--json").stdout)
    assert status["status"] == "finished" and status["device"].startswith("cuda")
    rows = [json.loads(line) for line in (bitnet_home / "runs" / "gpu" / "metrics.jsonl")
            .read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0]


def test_sigkill_then_resume_on_cuda_continues_the_trajectory(bitnet_home):
    invoke("train", *ARGS, "--name", "reference")
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", "train", *ARGS, "--name",
                             "killed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = bitnet_home / "runs" / "killed" / "state.json"
    wait_until(lambda: state_step(state) >= 25, "step 25", proc, 300)
    proc.kill()
    proc.wait()
    invoke("resume", "killed")
    reference, resumed = final_tensors(bitnet_home, "reference"), final_tensors(bitnet_home, "killed")
    identical = all(torch.equal(reference[k], resumed[k]) for k in reference)
    worst = max(float((reference[k] - resumed[k]).abs().max()) for k in reference)
    print(f"resumed on CUDA: bit-identical={identical}, largest weight difference {worst:.2e}")
    assert worst < 1e-3


def test_two_gpus_train_with_nccl(bitnet_home):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    invoke("train", *ARGS, "--nproc-per-node", "2", "--name", "ddp")
    status = json.loads(invoke("status", "ddp", "--json").stdout)
    assert status["status"] == "finished" and status["world_size"] == 2


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    from tests.cli import home_at
    home = tmp_path_factory.mktemp("gpu-home")
    with home_at(home):
        invoke("train", "arithmetic", "--size", "tiny", "--steps", "40", "--eval-every", "40",
               "--device", "cuda", "--name", "arith")
    return home


def test_int8_engine_on_cuda_matches_the_float_engine(arithmetic_run):
    from bitnet_cli.use.loading import load_model
    from bitnet_cli.nn.model import generate
    from tests.cli import home_at
    with home_at(arithmetic_run):
        fast = load_model("arith", "cuda", "int8")
        slow = load_model("arith", "cuda", "float")
    prompt = fast.tokenizer.encode("12+35=").ids
    assert fast.engine == "int8"
    assert list(generate(fast.model, prompt, 6)) == list(generate(slow.model, prompt, 6))


def test_chat_and_eval_on_cuda(arithmetic_run):
    from tests.cli import home_at
    with home_at(arithmetic_run):
        on_gpu = invoke("chat", "arith", "--device", "cuda", "--prompt", "12+35=",
                        "--temperature", "0").stdout
        on_cpu = invoke("chat", "arith", "--device", "cpu", "--engine", "float", "--prompt",
                        "12+35=", "--temperature", "0").stdout
        report = json.loads(invoke("eval", "arith", "--device", "cuda", "--json").stdout)
        reference = json.loads(invoke("eval", "arith", "--device", "cpu", "--engine", "float",
                                      "--json").stdout)
    assert on_gpu == on_cpu
    # bf16 autocast on the GPU against float32 on the CPU: the same model, measured alike.
    gpu, cpu = report["metrics"], reference["metrics"]
    assert report["device"].startswith("cuda") and reference["device"] == "cpu"
    assert abs(gpu["loss"] - cpu["loss"]) <= 0.02 * cpu["loss"], (gpu["loss"], cpu["loss"])
    assert abs(gpu["acc"] - cpu["acc"]) <= 0.05, (gpu["acc"], cpu["acc"])


def test_play_on_cuda(bitnet_home):
    invoke("train", "tictactoe", "--size", "tiny", "--steps", "20", "--eval-every", "20",
           "--device", "cuda", "--name", "ttt")
    result = runner_play("ttt", "5\n1\n9\n3\n7\n2\n4\n6\n8\nn\n")
    assert "Playing" in result.output and "Traceback" not in result.output


def runner_play(run, moves):
    from bitnet_cli.cli import app
    from tests.cli import runner
    result = runner.invoke(app, ["play", run, "--device", "cuda"], input=moves)
    assert result.exit_code == 0, result.output
    return result
