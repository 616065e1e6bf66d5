#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install llmopt into it, editable, with dev tools.
#
#   scripts/install.sh [VENV_DIR] [EXTRA_REQUIREMENT...]
#
# VENV_DIR defaults to .venv. EXTRA_REQUIREMENTs are installed together with llmopt, e.g.
# 'transformers==4.57.*' for the environment that tests the oldest supported transformers.
#
# PyTorch is installed only when the environment cannot import it already, as
# $LLMOPT_TORCH_SPEC (default torch==2.13.0; split into words, so it may carry pip options such
# as --index-url). Where torch is present it is kept: pyproject.toml only asks for torch>=2.4.
# LLMOPT_VENV_ARGS goes to `python -m venv` (--system-site-packages reuses a torch installed
# outside the environment); PYTHON picks the interpreter (default python3).
#
# Every other package comes from the tested set in $LLMOPT_CONSTRAINTS (default
# constraints/main.txt, written by `make lock`): with exact versions pip has nothing to search, so
# a fresh install takes about a minute instead of backtracking through every grpcio-tools release
# (tritonclient caps protobuf below 7, the newest grpcio-tools needs 7). LLMOPT_CONSTRAINTS=""
# installs the newest versions pyproject.toml allows instead.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-.venv}"
[ "$#" -gt 0 ] && shift
python="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# --no-compile: bytecode is compiled on first import instead, which halves the install time
# (torch alone: 43 s -> 19 s here).
pip_install=(-m pip install --no-compile)

if [ ! -x "$venv/bin/python" ]; then
    echo "install: creating $venv with $("$python" --version)"
    # shellcheck disable=SC2086  # LLMOPT_VENV_ARGS is a list of options
    "$python" -m venv ${LLMOPT_VENV_ARGS:-} "$venv"
fi
py="$venv/bin/python"

if "$py" -c "import torch" 2>/dev/null; then
    echo "install: keeping torch $("$py" -c "import torch; print(torch.__version__)")"
else
    read -r -a torch_spec <<< "${LLMOPT_TORCH_SPEC:-torch==2.13.0}"
    echo "install: installing ${torch_spec[*]}"
    "$py" "${pip_install[@]}" "${torch_spec[@]}"
fi

constraints="${LLMOPT_CONSTRAINTS-constraints/main.txt}"
constraint_args=()
if [ -n "$constraints" ]; then
    echo "install: versions from $constraints"
    constraint_args=(-c "$constraints")
fi
"$py" "${pip_install[@]}" "${constraint_args[@]}" -e ".[dev]" "$@"
"$py" - <<'PY'
import torch, transformers
print(f"install: done: torch {torch.__version__}, transformers {transformers.__version__}")
PY
