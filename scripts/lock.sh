#!/usr/bin/env bash
# Write the packages installed in VENV as a pip constraints file (torch and llmopt excluded:
# torch is the user's choice of build, llmopt is the project itself).
#
#   scripts/lock.sh VENV OUT
set -euo pipefail
venv="$1"
out="$2"
{
    echo "# Tested versions, installed by scripts/install.sh through \`pip install -c $out\`."
    echo "# Written by \`make lock\` on $("$venv/bin/python" --version), $(uname -sm); edit by re-locking."
    "$venv/bin/python" -m pip freeze --exclude-editable | grep -vE '^(#|torch==)'
} > "$out"
echo "lock: $(grep -vc '^#' "$out") packages -> $out"
