#!/usr/bin/env bash
# A one-minute check that training works, in a throwaway runs folder.
set -euo pipefail
export BITNET_HOME="${BITNET_HOME:-$(mktemp -d)}"
bitnet train simple --steps 100
run=$(ls -d "$BITNET_HOME"/runs/* | tail -n 1)
echo
echo "run folder: $run"
ls "$run" "$run/checkpoints"
tail -n 1 "$run/metrics.jsonl"
