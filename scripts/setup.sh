#!/usr/bin/env bash
# Create .venv and install a matching torch/torchaudio pair plus this package with its test extras.
# Works on a fresh machine (no GPU needed): the torchaudio wheels on PyPI link against the CUDA build of
# torch, which imports and runs on a CPU; the CPU-only torch build cannot load torchaudio (torchaudio needs the CUDA build's libraries).
# Re-running is fast: nothing is reinstalled while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_PAIR=("torch==2.11.0" "torchaudio==2.11.0")

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.lightning-stability-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] && "$VENV/bin/python" -c "import torchaudio, lightning_stability" 2>/dev/null; then
    echo "[setup] $VENV is up to date"
    exit 0
fi

echo "[setup] installing ${TORCH_PAIR[*]} and lightning-stability[test] (first run downloads ~4.6 GB)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TORCH_PAIR[@]}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]" "${TORCH_PAIR[@]}"
"$VENV/bin/python" -c "import torch, torchaudio; print(f'[setup] torch {torch.__version__}, torchaudio {torchaudio.__version__}')"
echo "$want" > "$stamp"
