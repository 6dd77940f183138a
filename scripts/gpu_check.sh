#!/usr/bin/env bash
# The GPU proof in one call (a lent machine, no network, under 8 minutes):
#   bash scripts/gpu_check.sh                 # CUDA: SmolVLM-256M shape (random weights), then the benches
#   bash scripts/gpu_check.sh --device cpu    # CPU: builtin:tiny, tiny schedule, no benches (tests/test_gpu_check.py)
# 1. installs the carried wheels (.whl/: transformers, peft, datasets, trl, pydantic, ...) beside the machine's torch;
# 2. runs the product commands as a user types them: `vlm-tune train` (baselines untrained + majority, eval during
#    training, final eval), `vlm-tune eval`, `vlm-tune predict`, `vlm-tune merge`;
#    then `vlm-tune push --merged` to a local folder and runs the pushed model card's own snippet;
# 3. (cuda) the `gpu` tests (SmolVLM and a Qwen stand-in: bf16/fp16 LoRA, full fine-tuning, QLoRA): part of the
#    verdict;
# 4. asserts that every model evaluation (every metrics.json: `devices` of all parameters and buffers), the
#    `predict` answer (its JSON line) and the merge (merged/merge.json) ran on the expected device (cuda / cpu)
#    only; the majority baseline has no model (device null);
# 5. (cuda) scripts/bench_gpu.py, scripts/bench_eval.py and scripts/bench_train.py in the time left, after the
#    verdict is written.
# Writes $OUT/summary.json (one file: device, per-command exit codes and times, every evaluation's metrics,
# where predict and merge ran) and a log per step. Exit 0 only when every product command and the snippet
# succeeded, the gpu tests passed (cuda) and everything ran on the device.
set -uo pipefail
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
WORK="${GPU_CHECK_WORK:-$(mktemp -d)}"; mkdir -p "$WORK"
BUDGET="${GPU_CHECK_BUDGET_S:-460}"   # whole script, seconds (the benches get what the product steps leave)
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || { echo "wheel install failed"; exit 3; }
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""   # the product's own device decision then picks cpu
mkdir -p "$WORK/bin"   # the `vlm-tune` console script, without needing `pip install -e .`
printf '#!/bin/sh\nexec "%s" -m vlm_tune.cli "$@"\n' "$PY" > "$WORK/bin/vlm-tune" && chmod +x "$WORK/bin/vlm-tune"
export PATH="$WORK/bin:$PATH"

STEPS="$OUT/steps.tsv"; : > "$STEPS"
step() {  # step NAME LIMIT_S CMD...: run (killed after LIMIT_S), log to $OUT/NAME.log, record exit code and seconds
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/commands.log"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  tail -n 12 "$OUT/$name.log"
  return $rc
}

CFG="$WORK/gpu_check.yaml"
RUN="$WORK/run"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  SHAPE="$WORK/cache/shapes/smolvlm-256m"
  step build_shape 150 "$PY" -c "from vlm_tune.standins.shapes import ensure_shape_model as e; e('smolvlm-256m', '$SHAPE', dtype='bfloat16', device='cuda')"
  cat > "$CFG" <<EOF
# SmolVLM-256M shape (random weights, published architecture and processor), synthetic 512-px charts.
# longest_edge 1024 = 2x2 tiles + global view = 320 image tokens per chart (the published 2048 gives 1088).
run: {name: gpu-check, output_dir: $RUN}
model: {name_or_path: $SHAPE, dtype: auto, cache_dir: $WORK/cache, image: {longest_edge: 1024}}
data: {synthetic: {n_train: 256, n_test: 48, image_size: 512}}
train: {batch_size: 8, max_steps: 30, save_steps: 15, logging_steps: 5, learning_rate: 2.0e-4, max_length: 1024}
eval: {batch_size: 16, max_new_tokens: 8, every_steps: 15, subset_size: 16, baselines: [untrained, majority]}
EOF
else
  cat > "$CFG" <<EOF
# builtin:tiny, tiny schedule: the same commands on CPU in about a minute.
run: {name: gpu-check-cpu, output_dir: $RUN}
model: {name_or_path: "builtin:tiny", dtype: auto, cache_dir: ${GPU_CHECK_CACHE:-$WORK/cache}, image: {longest_edge: 64}}
data: {synthetic: {n_train: 32, n_test: 8}}
train: {batch_size: 4, max_steps: 4, save_steps: 2, logging_steps: 1, learning_rate: 1.0e-2, max_length: 256}
eval: {batch_size: 4, max_new_tokens: 3, every_steps: 2, subset_size: 4, baselines: [untrained, majority]}
EOF
fi

ok=1
# every import the commands need (the machine's own packages + the carried wheels)
"$PY" -c "
import importlib.util
mods = ['torch', 'transformers', 'peft', 'accelerate', 'datasets', 'trl', 'pydantic', 'yaml', 'rich', 'matplotlib']
missing = [m for m in mods if importlib.util.find_spec(m) is None]
import torch, transformers
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)
print('missing:', missing or 'none', '| bitsandbytes:', importlib.util.find_spec('bitsandbytes') is not None)
" 2>&1 | tee -a "$OUT/gpu.txt"
step train 300 vlm-tune train "$CFG" --overwrite || ok=0
step eval 150 vlm-tune eval "$CFG" --name cli || ok=0
"$PY" -c "
from vlm_tune.config import load_config
from vlm_tune.data.sources import load_split
cfg = load_config('$CFG')
load_split(cfg.data, 'test', cfg.model.cache_dir).row(0)['images'][0].save('$WORK/chart.png')" || ok=0
step predict 120 vlm-tune predict --adapter "$RUN/final" --image "$WORK/chart.png" --question "How many bars are there?" --json || ok=0
step merge 150 vlm-tune merge "$RUN/final" "$RUN/merged" || ok=0
step push 60 vlm-tune push "$RUN" --repo-id "$WORK/pushed" --merged || ok=0
# the pushed card's snippet, as a user copies it: loads the pushed folder and answers about the chart
"$PY" - "$WORK/pushed/README.md" "$WORK/pushed" "$WORK/chart.png" "$WORK/snippet.py" <<'PY' || ok=0
import re, sys
card, repo, chart, out = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3], sys.argv[4]
code = re.search(r"^(`{3,})python\n(.*?)\n\1$", card, re.S | re.M).group(2)
code = code.replace('repo = "ORG/NAME"', f"repo = {repo!r}").replace('"chart.png"', repr(chart))
open(out, "w").write(code)
PY
step snippet 150 "$PY" "$WORK/snippet.py" || ok=0
if [ "$DEVICE" = cuda ]; then  # part of the verdict: a failing gpu test fails the check
  step gpu_tests 150 "$PY" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider || ok=0
fi

# the verdict: every evaluation, predict and merge ran on the device, every step exited 0 (scripts/gpu_verdict.py)
"$PY" scripts/gpu_verdict.py "$RUN" "$DEVICE" "$STEPS" "$OUT/summary.json" "$ok" || ok=0

if [ "$DEVICE" = cuda ]; then  # benches in the time left (each bounded), after the proof is written
  left() { echo $((BUDGET - SECONDS)); }
  if [ "$(left)" -gt 120 ]; then
    B=$(( $(left) - 80 )); [ "$B" -gt 200 ] && B=200
    timeout "$((B + 40))" "$PY" scripts/bench_gpu.py --shape smolvlm-256m --time-budget "$B" --cache-dir "$WORK/cache" \
      --out "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1; tail -30 "$OUT/bench_gpu.log"
  fi
  if [ "$(left)" -gt 150 ]; then  # evaluation feeding: the target is after/before >= 1 (eval never waits on the CPU)
    timeout 90 "$PY" scripts/bench_eval.py --models smolvlm-256m --repeats 1 --rows 64 --batch-size 16 \
      --cache-dir "$WORK/cache" > "$OUT/bench_eval.log" 2>&1; tail -8 "$OUT/bench_eval.log"
  fi
  if [ "$(left)" -gt 60 ]; then
    timeout "$(( $(left) - 10 ))" "$PY" scripts/bench_train.py --device cuda --model "$SHAPE" --steps 20 --warmup 5 \
      --repeats 1 --batch-size 8 --json "$OUT/bench_train_256m.json" > "$OUT/bench_train_256m.log" 2>&1
    tail -15 "$OUT/bench_train_256m.log"
  fi
fi
echo "gpu_check: ok=$ok in ${SECONDS}s; summary $OUT/summary.json"
[ "$ok" = 1 ]
