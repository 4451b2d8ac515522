#!/usr/bin/env bash
# One CPU benchmark job: fadjax's benchmark and the PyTorch peer's --quick mode, same shapes, same job.
#
#   bash bench/run_cpu.sh            # from the repo root; needs torch, diffusers, transformers (the test extra)
#
# The peer's --quick mode is its U-Net at block widths 32,64,128 (4 heads, context 32) on 64x64x1 images,
# a ResNet50-layout expert at 1/4 width (torchvision's full ResNet50 when torchvision is installed) and a
# 2-layer CLIP text encoder; it times fp32 train steps at batch 4 and 64 and U-Net calls at batch 1 and 8.
# Ours runs the same U-Net shape (configs/feature_aligned.py with three overrides) with a ResNet50 expert
# at stem width 16 (stage widths 64..512, the peer's fallback expert's). Our lines come first, then the
# peer's, all in $OUT/bench.jsonl; the tables in $OUT/summary.md.
set -u
OUT=${OUT:-/tmp/fadjax_bench_cpu}
PEER=${PEER:-../shared/peers/torch_reference_step.py}
mkdir -p "$OUT"
JSONL=$OUT/bench.jsonl
LOG=$OUT/bench.log
: >"$JSONL"
T0=$SECONDS
export JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
log() { echo "[+$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
SETS=${SETS:-cpu quick}  # which sets to run: "cpu" (the cpu preset's shapes), "quick" (the peer's --quick shapes)
# peer LABEL ARGS...: runs the peer (python3 ARGS...) and appends its JSON lines to $JSONL, its output to $LOG.
peer() {
  local label=$1; shift
  log "peer: $label"
  python3 "$@" >"$OUT/peer.out" 2>&1 || log "peer failed rc=$?"
  grep '^{' "$OUT/peer.out" >>"$JSONL"
  cat "$OUT/peer.out" >>"$LOG"
  rm -f "$OUT/peer.out"
}
# ours SHAPE ARGS...: our benchmark with the shape flags SHAPE (word-split) and ARGS.
ours() {
  local shape=$1; shift
  log "ours: $*"
  python -m fadjax.bench $shape "$@" >>"$LOG" 2>&1 || log "failed rc=$?"
}
log "bench/run_cpu.sh: sets $SETS, out $OUT, commit $(git rev-parse --short HEAD 2>/dev/null), $(nproc) cores"

# The cpu preset's train step (reproduce --preset cpu: 32x32x1, U-Net 16,32,64,128 with attention at 8x8 and
# 4x4 only, 4 heads, context 128, 8 groups, batch 32, fp32), ours and the peer's at the same U-Net shapes.
# The peer's aligned step carries its own ResNet50 expert and CLIP text encoder (and its hook fits only
# three levels), so the like-for-like ratio is the baseline step (U-Net forward+backward+Adam); the peer's
# baseline still runs its CLIP text encoder every step, as the paper's code does. Ours: the baseline step
# and the preset's aligned step (ResNet18 expert at stem width 16).
if [[ " $SETS " == *" cpu "* ]]; then
CPUSHAPE="--config configs/feature_aligned.py --config.data.image_size 32 --config.model.block_out_channels 16,32,64,128
  --config.model.attention_levels 2,3 --config.model.attention_head_dim 4 --config.model.cross_attention_dim 128
  --config.model.norm_num_groups 8 --config.align.unet_feature down_3_shortcut --dtype float32 --jsonl $JSONL"
ours "$CPUSHAPE" --what baseline_step --batch 32 --warmup 2 --iters 5 --repeats 3
ours "$CPUSHAPE" --what train_step --batch 32 --expert_arch resnet18 --expert_width 16 --warmup 2 --iters 5 --repeats 3
if [ -f "$PEER" ]; then
  peer "at the cpu preset's shapes (bench/peer_at_shapes.py)" bench/peer_at_shapes.py "$PEER" --image_size 32 \
    --block_out_channels 16,32,64,128 --attention_levels 2,3 --heads 4 --cross_dim 128 --norm_num_groups 8 \
    --batch 32 --steps 15 --align off
fi
fi

if [[ " $SETS " == *" quick "* ]]; then
QUICK="--config configs/feature_aligned.py --config.model.block_out_channels 32,64,128
  --config.model.cross_attention_dim 32 --config.model.attention_head_dim 4 --expert_arch resnet50 --expert_width 16
  --dtype float32 --jsonl $JSONL"

# The peer's --quick set: fp32 train steps at batch 4 and 64 (3 warm-up + 2 timed steps), U-Net calls at
# batch 1 and 8 (3 timed). Ours: the same, plus the baseline step (the alignment's cost).
ours "$QUICK" --what train_step --batch 4 --warmup 1 --iters 2 --repeats 2
ours "$QUICK" --what train_step --batch 64 --warmup 0 --iters 1 --repeats 2
ours "$QUICK" --what baseline_step --batch 64 --warmup 0 --iters 1 --repeats 2
ours "$QUICK" --what sample --batch 1 --steps 3 --sampler ddpm --warmup 1 --iters 1 --repeats 2
ours "$QUICK" --what sample --batch 8 --steps 3 --sampler ddpm --warmup 1 --iters 1 --repeats 2

if [ -f "$PEER" ]; then
  peer "python3 $PEER --quick" "$PEER" --quick
else
  log "no peer at $PEER"
fi
fi
python3 bench/summarise.py "$JSONL" >"$OUT/summary.md" 2>>"$LOG"
log "done in $((SECONDS - T0))s"
cat "$OUT/summary.md"
