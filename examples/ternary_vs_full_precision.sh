#!/usr/bin/env bash
# The same tiny arithmetic model, seed and data, trained ternary and in full precision.
set -euo pipefail
export BITNET_HOME="${BITNET_HOME:-$(mktemp -d)}"
steps="${STEPS:-3000}"
bitnet train arithmetic --size tiny --steps "$steps" --name ternary
bitnet train arithmetic --size tiny --steps "$steps" --quant none --name full-precision
for run in ternary full-precision; do
  printf '%-15s ' "$run"
  grep '"split": "eval"' "$BITNET_HOME/runs/$run/metrics.jsonl" | tail -n 1 |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print({k: round(v, 3) for k, v in r.items() if k.startswith("acc")})'
done
