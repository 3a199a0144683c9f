"""Small models for tests that need a checkpoint but not a trained one."""

import random

import torch

from bitnet_cli.config.reading import to_dict
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.data.shards import EOT, train_tokenizer
from bitnet_cli.data.stories import story
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.store.checkpoint import save_checkpoint
from bitnet_cli.tasks import load_experiment


def random_checkpoint(folder, experiment="simple", tokenizer=None, **shape):
    """A checkpoint with random weights (init std 0.02), written by the real checkpoint code."""
    tokenizer = tokenizer or load_experiment(experiment).tokenizer()
    model_shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=192, max_position_embeddings=32)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), **{**model_shape, **shape})
    torch.manual_seed(0)
    model = BitNetForCausalLM(config)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    trainer = {"step": 1, "experiment": experiment, "model": to_dict(config)}
    return save_checkpoint(folder / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()),
                           trainer, keep=1, tokenizer=folder / "tokenizer.json")


def story_tokenizer():
    rng = random.Random(0)
    return train_tokenizer((story(rng) + EOT for _ in range(200)), vocab_size=320)
