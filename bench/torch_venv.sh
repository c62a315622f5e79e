# Sourced by the benchmarks: sets VENV to a Python environment with PyTorch. TORCH_VENV=/path
# reuses an existing one (saves the download); else PyTorch's CPU wheels go into bench/.venv
# (gitignored), from PyPI when download.pytorch.org cannot be reached.
VENV=${TORCH_VENV:-bench/.venv}
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    python3 -m venv bench/.venv
    bench/.venv/bin/pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu \
        || bench/.venv/bin/pip install --quiet torch
    VENV=bench/.venv
fi
