#!/usr/bin/env bash
# Set up pcfm in a virtual environment (.venv, or $PCFM_VENV) on a fresh machine.
#
# - torch: kept if the environment already has one (install your CUDA build first on a GPU
#   machine); otherwise the CPU build torch==2.13.0 is installed. A bare "torch" requirement
#   would pull a multi-GB CUDA build.
# - torch-cluster (fast CPU kNN) is source-only on PyPI: built against the installed torch with
#   --no-build-isolation (about 10 minutes on 2 cores the first time; pip caches the wheel). A
#   failed build is not fatal, and PCFM_NO_EXTENSIONS=1 skips it: pcfm then uses its pure-torch
#   fallbacks. torch-scatter (the other PyG extension, same procedure, ~5 minutes) is not built:
#   pcfm does not need it; PCFM_WITH_SCATTER=1 builds it too.
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
    extensions=("torch-cluster>=1.6")
    [ "${PCFM_WITH_SCATTER:-0}" = "1" ] && extensions+=("torch-scatter>=2.1")
    if ! "$py" -c "import torch_cluster" 2>/dev/null || { [ "${PCFM_WITH_SCATTER:-0}" = "1" ] && ! "$py" -c "import torch_scatter" 2>/dev/null; }; then
        echo "install.sh: building ${extensions[*]} against torch $("$py" -c 'import torch; print(torch.__version__)') (minutes on first install)"
        MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation "${extensions[@]}" \
            || echo "install.sh: WARNING: building ${extensions[*]} failed; pcfm will use its pure-torch fallbacks"
    fi
fi
"$py" -c "import pcfm, torch; print(f'pcfm {pcfm.__version__} ready with torch {torch.__version__} in $venv')"
