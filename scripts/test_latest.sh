#!/usr/bin/env bash
# The newest releases: a separate venv with torch at the lock's CPU build and the newest release of every
# other dependency (`pip install --upgrade`), the versions it got, then the test suite there.
#   bash scripts/test_latest.sh [--fast] [--write-lock] [--no-install]     (make test-latest, make lock)
#   --fast        run -m "not gpu and not slow" instead of -m "not gpu"
#   --write-lock  once the whole suite passed, write that venv's freeze as the lock (the one way to refresh it)
#   --no-install  use the venv as it is
# LATEST_VENV=... the venv (default .venv-latest); VLM_TUNE_LOCK=... the lock (default vlm_tune/requirements.lock);
# TORCH_VERSION=... moves torch; TORCHVISION_VERSION=... the GPU stack's torchvision (default: the one pip
# resolves for that torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LATEST_VENV:-.venv-latest}"
LOCK="${VLM_TUNE_LOCK:-vlm_tune/requirements.lock}"
FAST=0 WRITE=0 INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --fast) FAST=1 ;;
    --write-lock) WRITE=1 ;;
    --no-install) INSTALL=0 ;;
    *) echo "usage: bash scripts/test_latest.sh [--fast] [--write-lock] [--no-install]" >&2; exit 2 ;;
  esac
done
if [ "$WRITE" = 1 ] && [ "$FAST" = 1 ]; then
  echo "test_latest: --write-lock needs the whole suite (-m 'not gpu'); drop --fast" >&2
  exit 2
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
PY="$VENV/bin/python"

if [ "$INSTALL" = 1 ]; then
  VLM_TUNE_LOCK="$LOCK" bash scripts/setup.sh "$VENV" --latest
fi
echo "[test-latest] the versions in $VENV, against the lock:"
"$PY" -m vlm_tune.cli env

MARK="not gpu"
[ "$FAST" = 1 ] && MARK="not gpu and not slow"
if ! "$PY" -m pytest -m "$MARK" -q; then
  if [ "$WRITE" = 1 ]; then
    echo "[test-latest] the suite failed with the newest releases: the lock is NOT written ($LOCK unchanged)" >&2
  else
    echo "[test-latest] the suite failed with the newest releases" >&2
  fi
  exit 1
fi
echo "[test-latest] the suite passed with the newest releases"
[ "$WRITE" = 1 ] || exit 0

TORCH="$("$PY" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])")"
TV="${TORCHVISION_VERSION:-}"
if [ -z "$TV" ]; then
  # the torchvision release that goes with this torch: what pip's resolver picks beside it (metadata only)
  REPORT="$(mktemp)"; trap 'rm -f "$REPORT"' EXIT
  "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$REPORT" "torch==$TORCH" torchvision >/dev/null
  TV="$("$PY" -c "import json, sys
print(next(i['metadata']['version'] for i in json.load(open(sys.argv[1]))['install'] if i['metadata']['name'] == 'torchvision'))" "$REPORT")"
fi
"$PY" scripts/write_lock.py --out "$LOCK" --torchvision "$TV" \
  --command "${TORCH_VERSION:+TORCH_VERSION=$TORCH_VERSION }bash scripts/test_latest.sh --write-lock"
