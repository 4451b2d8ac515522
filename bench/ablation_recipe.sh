#!/usr/bin/env bash
# The recipe's ablation (issue 32): one U-Net per arm, trained from scratch at the cpu preset's shapes with
# one change added at a time, each sampled with the old and the new sampler settings and measured by the
# same judge (FD, generation accuracy, precision/recall and one TSTR classifier; bench/pilot_recipe.py).
#
#   bash bench/ablation_recipe.sh                 # from the repo root; ~20 min per arm on 2 cores
#   STEPS=600 ARMS="old v v_snr" bash bench/ablation_recipe.sh
#
# Arms (cumulative): old = the paper's objective (epsilon, plain MSE, 2 flips, EMA 0.999 with warm-up);
# v = + v-prediction; v_snr = + min-SNR-5; v_snr_8 = + all 8 symmetries; new = + power-function EMA
# (sigma_rel 0.1), the cpu preset's recipe. Lines go to $OUT/ablation.jsonl; docs/decisions.md holds the table.
set -euo pipefail
DATA=${DATA:-folder:../shared/data/kather2016_gray}
OUT=${OUT:-out/ablation}
STEPS=${STEPS:-1000}
ARMS=${ARMS:-old v v_snr v_snr_8 new}
SETTINGS=${SETTINGS:-"ddpm:25:3 dpmpp_2m:15:3:0.28-5.4"}
PER_CLASS=${PER_CLASS:-30}
mkdir -p "$OUT"
if [ ! -d "$OUT/judge2/best" ]; then
  python train.py --config configs/expert.py:cpu,judge2 --workdir "$OUT/judge2" --config.data.source="$DATA" \
    > "$OUT/judge2.log" 2>&1
fi
common=(--config configs/baseline.py:cpu --config.data.source="$DATA" --config.train.num_steps="$STEPS"
        --config.optim.lr=1e-3 --config.optim.warmup_steps=100 --config.train.checkpoint_every="$STEPS")
for arm in $ARMS; do
  case $arm in
    old)     set_=(--config.diffusion.prediction=epsilon --config.diffusion.loss_weighting=none
                   --config.data.transpose=false --config.train.ema_sigma_rel=0 --config.train.ema_decay=0.999) ;;
    v)       set_=(--config.diffusion.loss_weighting=none --config.data.transpose=false
                   --config.train.ema_sigma_rel=0 --config.train.ema_decay=0.999) ;;
    v_snr)   set_=(--config.data.transpose=false --config.train.ema_sigma_rel=0 --config.train.ema_decay=0.999) ;;
    v_snr_8) set_=(--config.train.ema_sigma_rel=0 --config.train.ema_decay=0.999) ;;
    new)     set_=() ;;
    *) echo "ablation_recipe.sh: error: unknown arm $arm (old, v, v_snr, v_snr_8, new)" >&2; exit 2 ;;
  esac
  echo "[$(date +%T)] arm $arm: training $STEPS steps"
  python train.py "${common[@]}" "${set_[@]}" --workdir "$OUT/$arm" > "$OUT/$arm.log" 2>&1
  echo "[$(date +%T)] arm $arm: sampling and measuring"
  # shellcheck disable=SC2086
  python bench/pilot_recipe.py --run "$OUT/$arm" --judge "$OUT/judge2" --per_class "$PER_CLASS" --tstr \
    --label "$arm" --out "$OUT/ablation.jsonl" --settings $SETTINGS >> "$OUT/pilot.log" 2>&1
done
echo "[$(date +%T)] done: $OUT/ablation.jsonl"
