#!/usr/bin/env bash
# Rebuild the dictionaries of the embedded default model dc-mini (dictionaries/dc-mini/), on its own corpus.
# About 20-30 minutes on 2 CPU cores. Usage: bash examples/build_dictionaries.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/dc-mini-dicts}
mkdir -p "$work"

# 1. the model's training corpus (speeches + generated task text) as JSONL documents
python examples/build_default.py --seed 0 --work "$work" --corpus-out "$work/corpus.jsonl"

# 2. one TopK dictionary per site (embed, attn.L, mlp.L, resid.L), all sites in one pass over the model
dictcircuits train --model dc-mini --sites all --arch topk --width 8x --k 32 --tokens 800k --batch-size 2048 \
    --lr 2e-3 --dataset "$work/corpus.jsonl" --out "$work/topk" --checkpoint-every 100 --save-dtype float16

# 3. ship them and measure them
rm -rf dictionaries/dc-mini && mkdir -p dictionaries/dc-mini
for site in "$work"/topk/*/; do cp -r "$site" dictionaries/dc-mini/; done
dictcircuits eval --model dc-mini --dictionaries dictionaries/dc-mini --dataset "$work/corpus.jsonl" \
    --tokens 32768 --skip 6500 --plots dictionaries/dc-mini/plots --json > dictionaries/dc-mini/eval.json
