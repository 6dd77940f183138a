#!/usr/bin/env bash
# One-call GPU check for a lent machine with no network (see docs/performance.md):
#   1. install the carried wheels (.whl/: transformers, peft, datasets, trl, bitsandbytes, pydantic) beside
#      the machine's own torch; 2. run the `gpu` tests; 3. run scripts/bench_gpu.py; 4. run
#      scripts/bench_train.py on the 256M shape (vlm-tune vs the notebook recipe, the 1.5x target).
# Results go to $OUT (gpu_tests.log, bench_gpu.json, bench_gpu.log, bench_train_256m.json/.log).
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
BUDGET="${BENCH_BUDGET_S:-270}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || { echo "wheel install failed"; exit 3; }
else
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider -x 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
timeout "$((BUDGET + 60))" python3 scripts/bench_gpu.py --time-budget "$BUDGET" --out "$OUT/bench_gpu.json" 2>&1 \
  | tee "$OUT/bench_gpu.log" | tail -60
SHAPE=.cache/vlm-tune/shapes/smolvlm-256m   # built by bench_gpu.py above
[ -f "$SHAPE/config.json" ] || python3 -c "from vlm_tune.shapes import ensure_shape_model as e; e('smolvlm-256m', '$SHAPE', dtype='bfloat16', device='cuda')"
timeout "${TRAIN_BENCH_S:-130}" python3 scripts/bench_train.py --device cuda --model "$SHAPE" --steps 25 --warmup 5 \
  --repeats 1 --batch-size 8 --json "$OUT/bench_train_256m.json" 2>&1 | tee "$OUT/bench_train_256m.log" | tail -15
