#!/usr/bin/env bash
# Run the callbacks' tests against the oldest Lightning and torchmetrics that pyproject.toml accepts (the `>=` floors
# of its `lightning` and `torchmetrics` dependencies), so the versions we declare are versions we test. Both are
# installed (without dependencies: everything else comes from .venv) into a throwaway folder that shadows .venv's
# copies through PYTHONPATH; .venv itself is left untouched. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
floor() { sed -n "s/^ *\"$1>=\([0-9][0-9.]*\)[,\"].*/\1/p" pyproject.toml | head -n 1; }
lightning="$(floor lightning)"
torchmetrics="$(floor torchmetrics)"
if [ -z "$lightning" ] || [ -z "$torchmetrics" ]; then
    echo "[floor] could not read the lightning/torchmetrics floors from pyproject.toml" >&2
    exit 2
fi
target="$(mktemp -d)"
trap 'rm -rf "$target"' EXIT
echo "[floor] lightning==$lightning torchmetrics==$torchmetrics"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$target" \
    "lightning==$lightning" "torchmetrics==$torchmetrics"
PYTHONPATH="$target:$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" - "$lightning" "$torchmetrics" <<'PY'
import sys

import lightning
import torchmetrics
from packaging.version import Version

got = (Version(lightning.__version__), Version(torchmetrics.__version__))
assert got == tuple(Version(v) for v in sys.argv[1:3]), (lightning.__file__, torchmetrics.__file__)
print(f"[floor] testing with {lightning.__file__} and {torchmetrics.__file__}")
PY
PYTHONPATH="$target:$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -q \
    tests/callbacks tests/metrics tests/reference tests/reliability/test_resume.py "$@"
