#!/usr/bin/env bash
# Rebuild the dictionaries of the embedded default model dc-mini (dictionaries/dc-mini/), on its own corpus.
# About 7 minutes on one CPU core. Usage: bash examples/build_dictionaries.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/dc-mini-dicts}
export OMP_NUM_THREADS=1   # one thread: float sums in a fixed order, so a rebuild gives bit-identical weights
mkdir -p "$work"

# 1. the model's training corpus (speeches + generated task text) as JSONL documents
python examples/build_default.py --seed 0 --work "$work" --corpus-out "$work/corpus.jsonl"

# 2. one TopK dictionary (k = 8) per site. Width 4 x d where the site has many directions in use; 2 x d at layer 0
#    and 1 x d for attention outputs, where wider dictionaries left more than 10% of their features dead.
common=(--model dc-mini --arch topk --k 8 --tokens 800k --batch-size 2048 --lr 2e-3 --dataset "$work/corpus.jsonl"
        --checkpoint-every 50 --save-dtype float16)
dictcircuits train "${common[@]}" --sites 'embed,mlp.1,mlp.2,resid.1,resid.2' --width 4x --out "$work/w4"
dictcircuits train "${common[@]}" --sites 'mlp.0,resid.0' --width 2x --out "$work/w2"
dictcircuits train "${common[@]}" --sites 'attn.*' --width 1x --out "$work/w1"

# 3. skip transcoders for every MLP (mlp_in.L): the replacement model of `trace --graph replacement`
dictcircuits train --model dc-mini --arch skip-transcoder --sites all --width 4x --k 16 --tokens 400k \
    --batch-size 2048 --lr 2e-3 --dataset "$work/corpus.jsonl" --checkpoint-every 50 --save-dtype float16 \
    --out "$work/skip"

# 4. ship them and measure them
rm -rf dictionaries/dc-mini/*/ dictionaries/dc-mini/eval.json
for site in "$work"/w4/*/ "$work"/w2/*/ "$work"/w1/*/ "$work"/skip/mlp_in.*/; do cp -r "$site" dictionaries/dc-mini/; done
dictcircuits eval --model dc-mini --dictionaries dictionaries/dc-mini --dataset "$work/corpus.jsonl" \
    --tokens 32768 --skip 6500 --plots dictionaries/dc-mini/plots --json > dictionaries/dc-mini/eval.json
