"""Feature-aligned diffusion (paper §IV): the U-Net's down-path features aligned to the expert's.

The baseline's config (``baseline.py``, every field and size variant) with alignment on.

  python train.py --config configs/feature_aligned.py --workdir runs/fad \
      --config.data.source=folder:/path/to/tiles --config.align.expert_workdir=runs/expert
  python train.py --config configs/feature_aligned.py:clean ...   # Table I ablation: expert on x0
  python train.py --config configs/expert.py:tiny --workdir /tmp/expert
  python train.py --config configs/feature_aligned.py:tiny --workdir /tmp/t \
      --config.align.expert_workdir=/tmp/expert                   # seconds on a CPU

Variants (after the colon, comma-separated): baseline.py's (tiny, cpu, fast, demo, micro), and
  clean   the expert sees the clean x0 instead of x_t (Table I);
  tokens  REPA-style token-wise alignment (issue 16): a cosine per position between the U-Net
          feature's tokens, projected by REPA's 3-layer MLP, and the expert's spatial map (its second
          stage: at 32 px a 4x4 grid, the grid of the paper's hook there); weight 0.5 as REPA.
"""
from fadjax import config_lib

baseline = config_lib.config_module("baseline", beside=__file__)
common = config_lib.config_module("common", beside=__file__)


def get_config(arg=None):
    variants = common.variants(arg)
    c = baseline.get_config(arg)
    c.align.enabled = True
    if "clean" in variants:
        c.align.expert_input = "clean"
    if "tokens" in variants:
        c.align.mode = "tokens"
        c.align.projector = "mlp"
        c.align.expert_feature = "stage_2"
        c.align.weight = 0.5
    return c
