#!/usr/bin/env bash
# Build the two comparison environments used by benchmarks/run.py:
#   benchmarks/.venv-dl       dictionary_learning (saprmarks; PyPI `dictionary-learning`, pins nnsight<0.4)
#   benchmarks/.venv-saelens  SAELens (PyPI `sae-lens`)
# Both see the system site-packages so the installed torch (2.13 CPU here) is reused; a constraints file keeps
# pip from replacing it (without it pip pulls a newer CUDA torch). dictionary_learning's nnsight 0.3 is installed
# into its own venv and shadows the system nnsight only there.
#
#   bash benchmarks/setup_envs.sh            # both
#   bash benchmarks/setup_envs.sh dl         # only one of: dl saelens
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3}"
torch_version="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
which="${*:-dl saelens}"

make_env() {  # name, packages...
  local dir="$here/.venv-$1"; shift
  if [ ! -x "$dir/bin/python" ]; then
    "$py" -m venv --system-site-packages "$dir"
  fi
  "$dir/bin/python" -m pip install --quiet -c "$constraints" "$@"
  # a dependency may bring a torchvision built for another torch; nothing here needs it, and transformers
  # imports it when present, so drop it when it does not load
  if ! "$dir/bin/python" -c "import torchvision" 2>/dev/null; then
    "$dir/bin/python" -m pip uninstall --quiet -y torchvision || true
  fi
  "$dir/bin/python" - <<'PY'
import importlib.metadata as md, torch
for name in ("dictionary-learning", "sae-lens", "nnsight"):
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
    *) echo "unknown environment $env (use dl or saelens)"; exit 2 ;;
  esac
done
