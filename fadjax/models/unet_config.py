"""The U-Net's architecture: the math-relevant keys of a diffusers U-Net ``config.json``.

``UNetConfig.from_dict`` reads a diffusers config, refusing any key or value whose math is not
implemented; ``tiny_sd_config`` is segmind/tiny-sd's architecture.
"""
from __future__ import annotations

import dataclasses
from typing import Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = (None, "UNetMidBlock2DCrossAttn")

# diffusers config.json keys that never change the math, whatever their value. `upcast_attention` only
# matters in half precision, and `jax.nn.dot_product_attention` always takes its softmax in float32.
_IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "dtype",
    "use_memory_efficient_attention", "split_head_dim", "upcast_attention",
    "addition_embed_type_num_heads",
})
# diffusers config.json keys accepted only at the value that gives the SD-1.x math implemented here.
_FIXED_KEYS = {
    "act_fn": "silu", "center_input_sample": False, "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "dual_cross_attention": False,
    "num_class_embeds": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "class_embeddings_concat": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The math-relevant keys of a diffusers U-Net `config.json` (defaults are diffusers' defaults).

    `attention_head_dim` is, as in every SD-1.x config and as diffusers reads it, the NUMBER of attention
    heads per block (int or one per down block); `num_attention_heads`, when set, takes its place.
    """
    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dropout: float = 0.0
    transformer_layers_per_block: int = 1
    # diffusers' "projection" class embedding: a TimestepEmbedding-shaped MLP maps a class vector of
    # width `projection_class_embeddings_input_dim` to the time embedding's width and adds it there, so
    # the class reaches every ResNet block, not only the cross-attention layers. Our U-Net feeds it the
    # mean of the cross-attention context (the class's own token in fadjax).
    class_embed_type: str | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.class_embed_type not in (None, "projection"):
            raise ValueError(f"unsupported class_embed_type {self.class_embed_type!r}: supported are None, 'projection'")
        if self.class_embed_type == "projection" and self.projection_class_embeddings_input_dim != self.cross_attention_dim:
            raise ValueError(f"class_embed_type 'projection' needs projection_class_embeddings_input_dim == "
                             f"cross_attention_dim ({self.cross_attention_dim}): the class vector is the context's "
                             f"mean; got {self.projection_class_embeddings_input_dim!r}")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types {self.down_block_types}, up_block_types {self.up_block_types} and "
                             f"block_out_channels {self.block_out_channels} must have the same length")
        for key, value, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                    ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ValueError(f"unsupported {key} {bad}: supported are {allowed}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}: supported are {MID_BLOCK_TYPES}")
        for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim", "norm_num_groups"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"unsupported {key} {value!r}: must be a positive int")
        heads = self.num_heads
        if len(heads) != n:
            raise ValueError(f"attention heads {heads} must be one int or one per down block ({n})")
        for i, channels in enumerate(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels[{i}]={channels} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
            if channels % heads[i]:
                raise ValueError(f"block_out_channels[{i}]={channels} is not divisible by {heads[i]} heads")

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Attention heads of each down block (up blocks use them reversed, the mid block the last)."""
        heads = self.num_attention_heads or self.attention_head_dim
        return (heads,) * len(self.block_out_channels) if isinstance(heads, int) else tuple(heads)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Builds a config from a diffusers `config.json` dict.

        Keys that do not change the math are ignored; a key this implementation does not know, or a value
        of a known key that would change the math (another block type, class/addition embeddings, ...),
        raises ValueError naming it.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in _FIXED_KEYS:
                fixed = _FIXED_KEYS[key]
                values = value if isinstance(value, (list, tuple)) else [value]
                if not all(v == fixed for v in values):
                    raise ValueError(f"unsupported U-Net config: {key}={value!r} (only {fixed!r} is implemented)")
            elif key not in _IGNORED_KEYS:
                raise ValueError(f"unsupported U-Net config key {key!r} (value {value!r})")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (tuples as lists), readable by `from_dict`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def tiny_sd_config(**overrides) -> UNetConfig:
    """segmind/tiny-sd's U-Net (BK-SDM-Tiny, 323.4M parameters at 4 channels), with field overrides."""
    base = UNetConfig(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        mid_block_type=None, block_out_channels=(320, 640, 1280), layers_per_block=1,
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
    return dataclasses.replace(base, **overrides)
