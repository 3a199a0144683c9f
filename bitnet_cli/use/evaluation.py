"""`bitnet eval`: measure a saved model on its own experiment's held-out task.

What that means is the experiment's to say, through the same `evaluate` that training runs
every eval_every steps, so the numbers line up with the run's curves: games won, drawn and lost
for tictactoe, exact match per operator for arithmetic, held-out loss for text. Perplexity is
added from the loss for every experiment.
"""

from __future__ import annotations

import math

from bitnet_cli.data.documents import local_files
from bitnet_cli.errors import BitnetError
from bitnet_cli.report.summary import imported_about, imported_name, model_label
from bitnet_cli.tasks import load_experiment
from bitnet_cli.use.loading import load_model
from bitnet_cli.store.runs import CONFIG_FILE
from bitnet_cli.nn.devices import autocast_for, resolve_device
from bitnet_cli.training.setup import read_run_config

EVAL_TOKENS = 10_000_000  # --data: how much text to split held-out from (as a run planned it)


def evaluate_model(selector: str, device: str = "auto", engine: str | None = None,
                   data: str | None = None) -> dict:
    """The metrics of the model a RUN|CKPT selector names, and what was measured. A text model
    is measured on the held-out part of `data` (local text) where given, else of its run's."""
    where = resolve_device(device)
    if data is not None:  # a missing or empty --data is said before a model loads
        local_files(data)
    loaded = load_model(selector, where, engine)
    about, label = imported_about(loaded.checkpoint), model_label(loaded)
    task = load_experiment(loaded.experiment)
    if data is not None and not hasattr(task, "prepare_eval"):
        raise BitnetError(f"--data is for text models; {loaded.checkpoint} is a "
                          f"{loaded.experiment} model, measured on its own problems")
    if data is not None:
        from pathlib import Path
        data = str(Path(data).expanduser().resolve())
        task.prepare_eval(data, loaded.config.vocab_size, EVAL_TOKENS, loaded.tokenizer,
                          loaded.config.max_position_embeddings)
    elif hasattr(task, "prepare_eval"):
        if about is not None:  # said first: its config.json has no training data to read
            raise BitnetError(f"{imported_name(loaded.checkpoint, about)} is an imported model: "
                              "it has no held-out text of its own; measure it on yours with "
                              "--data PATH")
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
    return {"checkpoint": str(loaded.checkpoint), "model": label, "imported": about,
            "experiment": None if about else loaded.experiment, "step": loaded.step,
            "params": loaded.config.num_params(), "device": str(where),
            "engine": loaded.engine, "engine_note": loaded.engine_note,
            "skipped_checkpoints": loaded.skipped,
            "headline": task.headline, "metrics": metrics}
