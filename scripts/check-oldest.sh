#!/usr/bin/env bash
# CI: the package as users install it, with the oldest versions it declares.
#   bash scripts/check-oldest.sh
# Builds the wheel, installs it in a new venv with the floors of pyproject.toml (torch, NumPy)
# and the test tools, and runs the fast test tier from a copy of the repository without src/,
# so that the tests import the installed wheel, not the source tree. Tests of packages this venv
# does not install (Lightning, transformers, JAX, the peers) are not collected (tests/conftest.py).
# Cost here: ~2 min to install torch 2.6 from PyPI (a CUDA build, ~5 GB with its CUDA libraries,
# unused on the CPU), ~3 min for the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
floor() { sed -n "s/.*\"$1>=\([0-9.]*\).*/\1/p" pyproject.toml | head -n 1; }
torch_v="$(floor torch)" numpy_v="$(floor numpy)"
printf 'torch==%s.*\nnumpy==%s.*\n' "$torch_v" "$numpy_v" > "$work/floors.txt"

python3 -m venv "$work/venv"
py="$work/venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check -c "$work/floors.txt")
mkdir "$work/pkg" && cp -r src pyproject.toml README.md LICENSE "$work/pkg/"  # builds out of the tree
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$work/dist" "$work/pkg"
wheel=$(ls "$work"/dist/polyak-*.whl)
"${pip[@]}" "torch==$torch_v.*" "numpy==$numpy_v.*"
"${pip[@]}" "$wheel[torch,study]" pytest hypothesis scipy

mkdir "$work/repo"
cp -r tests examples benchmarks docs scripts .ci README.md pyproject.toml constraints.txt "$work/repo/"
cd "$work/repo"
"$py" - <<'PY'
import numpy, polyak, torch
assert "site-packages" in polyak.__file__, polyak.__file__  # the wheel, not the source tree
print(f"oldest versions: torch {torch.__version__}, numpy {numpy.__version__}, "
      f"polyak {polyak.__version__} from {polyak.__file__}")
PY
"$py" -m pytest -q -p no:cacheprovider tests
