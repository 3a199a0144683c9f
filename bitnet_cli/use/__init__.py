"""Using a trained model: loading it from a run or checkpoint folder, chatting, playing,
evaluating and exporting it. Imports the folders below (training/ for a run's config, which
evaluation reads); never bench/, ui/ or cli/."""
