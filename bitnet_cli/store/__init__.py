"""What a run leaves on disk and how it is read back: files written whole or not at all,
the runs folder (run ids, state.json, the one-writer lock, removal), which run a RUN argument
names (selector.py), metrics.jsonl and TensorBoard events, and safetensors checkpoints.
Imports config/ and nothing above it; no torch at import except checkpoint.py."""
