"""What a run is made of, before any of it exists: the model's shape and the training
settings (ModelConfig, TrainConfig, checked field by field) and the experiments' presets.
Pure Python, no torch; imports only bitnet_cli.errors. Every other folder may import it."""
