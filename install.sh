#!/usr/bin/env bash
# Set up pcfm in a virtual environment (.venv, or $PCFM_VENV) on a fresh machine.
#
# - torch: kept if the environment already has one (install your CUDA build first on a GPU
#   machine); otherwise the CPU build torch==2.13.0 is installed. A bare "torch" requirement
#   would pull a multi-GB CUDA build.
# - torch-scatter and torch-cluster are source-only on PyPI: built against the installed torch
#   with --no-build-isolation (about 5 + 10 minutes on 2 cores the first time; pip caches the
#   wheels). PCFM_NO_EXTENSIONS=1 skips them: pcfm then uses its pure-torch fallbacks.
set -euo pipefail
cd "$(dirname "$0")"
venv=${PCFM_VENV:-.venv}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
pip_install() { "$py" -m pip install --disable-pip-version-check --progress-bar off "$@"; }

pip_install --quiet --upgrade pip setuptools wheel ninja
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "install.sh: installing the CPU build of torch 2.13.0"
    pip_install torch==2.13.0
fi
pip_install --quiet -e ".[dev]"
if [ "${PCFM_NO_EXTENSIONS:-0}" != "1" ]; then
    if ! "$py" -c "import torch_scatter, torch_cluster" 2>/dev/null; then
        echo "install.sh: building torch-scatter and torch-cluster against $("$py" -c 'import torch; print(torch.__version__)') (minutes on first install)"
        MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation "torch-scatter>=2.1" "torch-cluster>=1.6"
    fi
fi
"$py" -c "import pcfm, torch; print(f'pcfm {pcfm.__version__} ready with torch {torch.__version__} in $venv')"
