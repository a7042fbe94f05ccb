#!/usr/bin/env bash
# Build the three comparison environments used by benchmarks/run.py:
#   benchmarks/.venv-dl        dictionary_learning (saprmarks; PyPI `dictionary-learning`, pins nnsight<0.4)
#   benchmarks/.venv-saelens   SAELens (PyPI `sae-lens`)
#   benchmarks/.venv-sparsify  sparsify (EleutherAI; PyPI `eai-sparsify`)
# Each venv first gets the torch of $PYTHON (2.13 CPU here) unless its system site-packages already provide it,
# then its library under a constraints file that pins that torch (without it pip pulls a newer CUDA torch).
# dictionary_learning's nnsight 0.3 is installed into its own venv and shadows the system nnsight only there.
#
#   PYTHON=/work/venv/bin/python bash benchmarks/setup_envs.sh      # all three
#   bash benchmarks/setup_envs.sh sparsify                          # only some of: dl saelens sparsify
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
torch_version="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
which="${*:-dl saelens sparsify}"

make_env() {  # name, packages...
  local dir="$here/.venv-$1"; shift
  if [ ! -x "$dir/bin/python" ]; then
    "$py" -m venv --system-site-packages "$dir"
  fi
  if ! "$dir/bin/python" -c "import torch" 2>/dev/null; then
    "$dir/bin/python" -m pip install --quiet "torch==$torch_version"
  fi
  "$dir/bin/python" -m pip install --quiet -c "$constraints" "$@"
  # a dependency may bring a torchvision built for another torch; nothing here needs it, and transformers
  # imports it when present, so drop it when it does not load
  if ! "$dir/bin/python" -c "import torchvision" 2>/dev/null; then
    "$dir/bin/python" -m pip uninstall --quiet -y torchvision || true
  fi
  "$dir/bin/python" - <<'PY'
import importlib.metadata as md, torch
for name in ("dictionary-learning", "sae-lens", "eai-sparsify", "nnsight"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print(f"  torch {torch.__version__}")
PY
}

for env in $which; do
  case "$env" in
    dl) echo "benchmarks/.venv-dl"; make_env dl dictionary-learning ;;
    saelens) echo "benchmarks/.venv-saelens"; make_env saelens sae-lens ;;
    sparsify) echo "benchmarks/.venv-sparsify"; make_env sparsify eai-sparsify ;;
    *) echo "unknown environment $env (use dl, saelens or sparsify)"; exit 2 ;;
  esac
done
