"""`bitnet eval`: measure a saved model on its own experiment's held-out task.

What that means is the experiment's to say, through the same `evaluate` that training runs
every eval_every steps, so the numbers line up with the run's curves: games won, drawn and lost
for tictactoe, exact match per operator for arithmetic, held-out loss for text. Perplexity is
added from the loss for every experiment.
"""

from __future__ import annotations

import math

from bitnet_cli.errors import BitnetError
from bitnet_cli.tasks import load_experiment
from bitnet_cli.use.loading import load_model
from bitnet_cli.store.runs import CONFIG_FILE
from bitnet_cli.nn.devices import autocast_for, resolve_device
from bitnet_cli.training.setup import read_run_config


def evaluate_model(selector: str, device: str = "auto", engine: str | None = None) -> dict:
    """The metrics of the model a RUN|CKPT selector names, and what was measured."""
    where = resolve_device(device)
    loaded = load_model(selector, where, engine)
    task = load_experiment(loaded.experiment)
    if hasattr(task, "prepare_eval"):
        # Text experiments hold out part of the data the run trained on: find it again from the
        # run's config, next to its checkpoints folder.
        config = loaded.checkpoint.parent.parent / CONFIG_FILE
        if not config.is_file():
            raise BitnetError(f"{loaded.checkpoint} is outside its run folder; evaluating a "
                              f"{loaded.experiment} model needs the run's config.json to find "
                              "its held-out text")
        _, _, cfg = read_run_config(config.parent)
        task.prepare_eval(cfg.data, cfg.text_vocab_size, cfg.data_budget,
                          loaded.tokenizer, loaded.config.max_position_embeddings)
    metrics = task.evaluate(loaded.model, where, autocast_for(where))
    metrics["ppl"] = math.exp(min(metrics["loss"], 50.0))
    return {"checkpoint": str(loaded.checkpoint), "experiment": loaded.experiment,
            "step": loaded.step, "params": loaded.config.num_params(), "device": str(where),
            "engine": loaded.engine, "engine_note": loaded.engine_note,
            "skipped_checkpoints": loaded.skipped,
            "headline": task.headline, "metrics": metrics}
