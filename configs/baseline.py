"""Baseline diffusion (paper §V-B): tiny-sd U-Net in pixel space, no feature alignment.

  python train.py --config configs/baseline.py --workdir runs/baseline \
      --config.data.source=folder:/path/to/tiles
  python train.py --config configs/baseline.py:tiny --workdir /tmp/base   # seconds on a CPU

Variants (after the colon, comma-separated): tiny.
"""
from fadjax import config_lib


def get_config(arg=None):
    return config_lib.diffusion_config(arg, align=False)
