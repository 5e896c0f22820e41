#!/usr/bin/env bash
# Every benchmark's GPU path in one run (about 8 minutes on one H100/H200; ONLY="NAME ..." runs some), for a GPU machine that has JAX (with
# its CUDA plugin), PyTorch and transformers but neither our other dependencies nor the SmolLM2 weights:
#
#   bash benchmarks/gpu.sh                 # on the GPU machine, from the repository root
#   SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu.sh   # the same plumbing at toy sizes, on any machine
#
# Missing pure-Python dependencies come as wheels in .whl/ (installed into /tmp/site when present; see the device
# tool's README for how to download them); the SmolLM2 config and tokenizer (no weights: 500 MB do not travel) in
# .carry/smollm2 (or HF_DIR), so every model-loading benchmark runs on random weights (fixed-length decoding costs
# the same whatever the weights; the search and RL rows time the machinery, not learning). Each benchmark has its
# own time limit and a failure does not stop the others. Results: each benchmark's JSON (this device's rows merged
# into a copy of benchmarks/results/*.json) and one log, all in $OUT (default benchmarks/results/gpu_run); copy the
# JSONs back over benchmarks/results/ and keep the log as benchmarks/results/<name>_<device>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu_run}"
HF="${HF_DIR:-.carry/smollm2}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
if [ -d .whl ] && [ -z "${SMOKE:-}" ]; then
  # into the interpreter's own environment: the verifier's workers run `python -I` (PYTHONPATH ignored)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  "$PY" -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__,
'| torch', torch.__version__, '| transformers', transformers.__version__)"; } 2>&1 | tee -a "$LOG"

bench() {  # bench NAME SECONDS ARGS...: one benchmark under its time limit, its rows merged into $OUT/NAME.json
  local name=$1 limit=$2; shift 2
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && return  # ONLY="rl_step mcts": just those
  [ -f "benchmarks/results/$name.json" ] && [ ! -f "$OUT/$name.json" ] && cp "benchmarks/results/$name.json" "$OUT/"
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local began=$SECONDS
  timeout "$limit" "$PY" "benchmarks/$name.py" "$@" --out "$OUT/$name.json" 2>&1 | grep -v "it/s]$" | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - began))s" | tee -a "$LOG"
}

if [ -n "${SMOKE:-}" ]; then
  bench train_step 300 --gpu-shape-smoke
  bench rl_step 600 --checkpoint "$HF" --random-weights --steps 1 --max-new-tokens 8 --wait-idle 0
  bench mcts 300 --hf-dir "$HF" --random-weights --problems 1 --iterations 1 --step-tokens 8 --rollout-tokens 8
  bench sampler 300 --hf-dir "$HF" --random-weights --batches 1 --reps 1 --new-tokens 8
  bench sampler_engine 300 --hf-dir "$HF" --random-weights --problems 1 --workloads mcts
else
  # SFT step: Llama-3.2-1B shape, bf16 compute, MFU (the GPU path of benchmarks/train_step.py)
  bench train_step 110 --gpu-only --gpu-reps 5
  # one RL step of the real rl stage (configs/rl_smollm2.py), bf16: where the time goes
  bench rl_step 150 --checkpoint "$HF" --random-weights --steps 3 --wait-idle 0
  # batched MCTS: sampler calls per round, expansions/s, live-row fraction at 1, 8 and 64 problems
  bench mcts 150 --hf-dir "$HF" --random-weights --problems 1 8 64
  # static sampler vs continuous engine, side by side: MCTS at 8 and 64 problems, rl_smollm2 rollouts
  bench sampler_engine 120 --hf-dir "$HF" --random-weights --problems 8 64
  # decoding throughput against HF generate, side by side
  bench sampler 140 --hf-dir "$HF" --random-weights --batches 1 16 64 --reps 3 3 3
fi
echo "done $(date -u)" | tee -a "$LOG"
