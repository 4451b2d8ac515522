#!/usr/bin/env bash
# One benchmark job on one H200: fadjax's benchmarks and the PyTorch peer's, in the same job.
#
#   bash bench/run_h200.sh        # from the repo root, on the GPU machine (bench/README.md: carry, wheels)
#
# Every JSON line goes to $OUT/bench.jsonl (ours through --jsonl, the peer's from its stdout), all
# output to $OUT/bench.log, the summary tables to $OUT/summary.md (also printed last). The parts run
# in order of importance, each under `timeout`; a part starts only when the job's deadline
# (BENCH_DEADLINE_S, default 340 s) leaves it its minimum, else a {"what": "skipped"} line says so.
set -u
OUT=${OUT:-/tmp/fadjax_bench}
mkdir -p "$OUT"
JSONL=$OUT/bench.jsonl
LOG=$OUT/bench.log
DEADLINE=${BENCH_DEADLINE_S:-340}
PEER=${PEER:-out/peer/torch_reference_step.py}
T0=$SECONDS
export PYTHONUNBUFFERED=1
# JAX: preallocate 90% of the card (the peer runs later, in its own process, after JAX has exited);
# a persistent compilation cache lets --max_batch reuse the batch-64 step compiled by the first part.
export XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export JAX_COMPILATION_CACHE_DIR=/tmp/fadjax_jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
export TF_CPP_MIN_LOG_LEVEL=1

log() { echo "[+$((SECONDS - T0))s] $*" | tee -a "$LOG"; }

# part NAME CAP_S MIN_S CMD...: CMD under timeout min(CAP_S, time left); skipped if less than MIN_S is left.
part() {
  local name=$1 cap=$2 min=$3
  shift 3
  local left=$((DEADLINE - (SECONDS - T0)))
  local budget=$((left < cap ? left : cap))
  if ((budget < min)); then
    log "SKIP $name: ${left}s left, it needs ${min}s"
    echo "{\"what\": \"skipped\", \"part\": \"$name\"}" >>"$JSONL"
    return
  fi
  log "START $name (timeout ${budget}s): $*"
  timeout -k 5 "$budget" "$@" >>"$LOG" 2>&1
  log "END $name rc=$?"
}

# peer_part NAME CAP_S MIN_S core|rest: the peer's own functions (bench/peer_parts.py); its JSON lines are kept,
# also from a part cut by its timeout.
peer_part() {
  local name=$1 cap=$2 min=$3 which=$4
  if [ ! -f "$PEER" ]; then
    log "SKIP $name: no peer at $PEER (copy ../shared/peers/torch_reference_step.py there, bench/README.md)"
    return
  fi
  local tmp=$OUT/peer_$which.out
  part "$name" "$cap" "$min" bash -c "python3 bench/peer_parts.py $PEER $which >$tmp 2>&1"
  if [ -f "$tmp" ]; then
    grep '^{' "$tmp" >>"$JSONL"
    cat "$tmp" >>"$LOG"
    rm -f "$tmp"
  fi
}

log "bench/run_h200.sh: deadline ${DEADLINE}s, out $OUT, commit $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv >>"$LOG" 2>&1

if compgen -G "out/whl/*.whl" >/dev/null; then  # Carried wheels: ml_collections (ours), diffusers (the peer).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site out/whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import jax, flax, ml_collections; print('jax', jax.__version__, jax.devices())" >>"$LOG" 2>&1

# BENCH_CONFIG / BENCH_EXTRA serve dry runs of this script on a CPU, e.g.
#   JAX_PLATFORMS=cpu BENCH_CONFIG=configs/feature_aligned.py:tiny BENCH_EXTRA="--warmup 0 --iters 1 --repeats 1" \
#   OUT=/tmp/dry bash bench/run_h200.sh
CFG=${BENCH_CONFIG:-configs/feature_aligned.py}
BENCH="python3 -m fadjax.bench --config $CFG --jsonl $JSONL ${BENCH_EXTRA:-}"

# 1. Feature-aligned step, baseline step and bf16 sampling (50 steps), batch 64, bf16, cuDNN attention.
part ours_all_bf16_b64 190 60 $BENCH --what all --batch 64 --dtype bfloat16 --attention cudnn --steps 50 --sampler ddim

# 2. The peer's headline figures: bf16 b64 with torch.compile and eager, and 1-image sampling.
peer_part peer_core 130 70 core

# 3. The paper's setting: float32, batch 4 (XLA attention: cuDNN's fused attention needs bf16/fp16).
part ours_f32_b4 75 45 $BENCH --what train_step --batch 4 --dtype float32 --attention xla

# 4. Sampling as the reference measured it: float32, batch 70, 50 steps.
part ours_sample_f32_b70 60 40 $BENCH --what sample --batch 70 --dtype float32 --steps 50 --sampler ddim

# 5. The peer's other figures: fp32 batch 4 and 64 (eager) and batch-70 sampling.
peer_part peer_rest 90 50 rest

# 6. The largest batch the bf16 train step fits, with whatever time is left.
LEFT=$((DEADLINE - (SECONDS - T0)))
part ours_max_batch $((LEFT - 5)) 75 $BENCH --what train_step --batch 64 --dtype bfloat16 --attention cudnn \
  --max_batch --max_batch_time_s $((LEFT - 60))

python3 bench/summarise.py "$JSONL" --peer_fallback bench/results/2026-11-28_h200_peer.jsonl >"$OUT/summary.md" 2>>"$LOG"
log "done in $((SECONDS - T0))s"
cat "$OUT/summary.md"
