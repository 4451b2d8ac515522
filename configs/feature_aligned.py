"""Feature-aligned diffusion (paper §IV): U-Net down-path features aligned to the expert's.

  python train.py --config configs/feature_aligned.py --workdir runs/fad \
      --config.data.source=folder:/path/to/tiles --config.align.expert_workdir=runs/expert
  python train.py --config configs/feature_aligned.py:clean ...   # Table I ablation: expert on x0
  python train.py --config configs/feature_aligned.py:tiny --workdir /tmp/t \
      --config.align.expert_workdir=/tmp/expert                   # seconds on a CPU

Variants (after the colon, comma-separated): tiny, clean.
"""
from fadjax import config_lib


def get_config(arg=None):
    return config_lib.diffusion_config(arg, align=True)
