"""Expert classifier (paper §V-A): ResNet50 on 224x224 grayscale tiles.

  python train.py --config configs/expert.py --workdir runs/expert \
      --config.data.source=folder:/path/to/Kather_texture_2016_image_tiles_5000 \
      --config.expert.pretrained=/path/to/microsoft-resnet-50
  python train.py --config configs/expert.py:tiny --workdir /tmp/expert   # seconds on a CPU

Variants (after the colon, comma-separated): tiny.
"""
from fadjax import config_lib


def get_config(arg=None):
    return config_lib.expert_config(arg)
