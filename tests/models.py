"""Small models for tests: random checkpoints, where a trained one is not needed, and short
trained runs shared by a session (conftest.short_run)."""

import hashlib
import random

import torch

from bitnet_cli.config.reading import to_dict
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.data.shards import EOT, train_tokenizer
from bitnet_cli.data.stories import story
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.store.checkpoint import save_checkpoint
from bitnet_cli.tasks import load_experiment
from tests.cli import home_at, invoke


def random_checkpoint(folder, experiment="simple", tokenizer=None, tweak=None, **shape):
    """A checkpoint with random weights (init std 0.02), written by the real checkpoint code;
    `tweak(model)` changes them first."""
    tokenizer = tokenizer or load_experiment(experiment).tokenizer()
    model_shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=192, max_position_embeddings=32)
    config = ModelConfig(**{"vocab_size": tokenizer.get_vocab_size(), **model_shape, **shape})
    torch.manual_seed(0)
    model = BitNetForCausalLM(config)
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    trainer = {"step": 1, "experiment": experiment, "model": to_dict(config)}
    return save_checkpoint(folder / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()),
                           trainer, keep=1, tokenizer=folder / "tokenizer.json")


def story_tokenizer():
    rng = random.Random(0)
    return train_tokenizer((story(rng) + EOT for _ in range(200)), vocab_size=320)


SHORT_STEPS = 30
# Text experiments train on local stories with a small batch and BPE.
TEXT_OPTIONS = ["--batch-size", "8", "--seq-len", "64", "--vocab-size", "512"]


def train_short_run(home, experiment):
    """A run of SHORT_STEPS steps of the experiment's tiny size in `home`, named after the
    experiment, evaluated and saved once, at its last step."""
    args = ["train", experiment, "--size", "tiny", "--steps", str(SHORT_STEPS),
            "--eval-every", str(SHORT_STEPS), "--save-every", str(SHORT_STEPS), "--no-compile",
            "--name", experiment]
    if experiment in ("tinystories", "baseline"):
        from bitnet_cli.data.stories import write_stories
        write_stories(home / "data", 600)
        args += [*TEXT_OPTIONS, "--data", str(home / "data")]
    with home_at(home):
        invoke(*args)
    return home / "runs" / experiment


def folder_digest(folder) -> str:
    """One hash of every file's path and bytes under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
