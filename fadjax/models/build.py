"""Builds the diffusion model of a run (U-Net + class conditioning) from its config.

Used by the trainer and by everything that loads a finished run, so both always build the
same modules. The label space of a run is: ``0 .. K-1`` the classes, then any extra
conditioning rows (DreamBooth identifiers), then the null label of classifier-free guidance
when the run trains with label dropout.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fadjax import config_lib


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """Which conditioning row means what."""

    class_names: tuple[str, ...]
    extra: tuple[str, ...] = ()  # Texts of extra rows (e.g. "sks tumor"), labels K, K+1, ...
    has_null: bool = False  # A last row used as the unconditional label.

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def size(self) -> int:
        return self.num_classes + len(self.extra) + int(self.has_null)

    @property
    def null_label(self) -> int | None:
        return self.size - 1 if self.has_null else None

    def extra_label(self, text: str) -> int:
        return self.num_classes + self.extra.index(text)

    def texts(self, prompt: str) -> list[str]:
        """The text of every non-null row, for CLIP conditioning."""
        return [prompt.format(n) for n in self.class_names] + list(self.extra)

    def to_dict(self) -> dict:
        return {"class_names": list(self.class_names), "extra": list(self.extra), "has_null": self.has_null}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSpace":
        return cls(tuple(d["class_names"]), tuple(d.get("extra", ())), bool(d.get("has_null", False)))


def unet_config(config, *, channels: int):
    """The ``UNetConfig`` of a run: the preset with the config's overrides."""
    from fadjax.models import unet_config as unet_config_lib
    m = config.model
    if m.preset != "tiny_sd":
        raise config_lib.ConfigError(f"config.model.preset: unknown preset {m.preset!r} (known: 'tiny_sd')")
    overrides = {"in_channels": channels, "out_channels": channels, "sample_size": config.data.image_size}
    boc = config_lib.parse_int_list(m.block_out_channels)
    if boc is not None:
        overrides["block_out_channels"] = boc
    n = len(boc or unet_config_lib.tiny_sd_config().block_out_channels)
    levels = config_lib.parse_int_list(m.get("attention_levels"))
    levels = range(n) if levels is None else set(levels)
    overrides["down_block_types"] = tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
    # Up block j works at level n-1-j.
    overrides["up_block_types"] = tuple("CrossAttnUpBlock2D" if n - 1 - j in levels else "UpBlock2D"
                                        for j in range(n))
    for key in ("attention_head_dim", "cross_attention_dim", "norm_num_groups", "layers_per_block"):
        if m.get(key) is not None:
            overrides[key] = int(m[key])
    cfg = unet_config_lib.tiny_sd_config(**overrides)
    if m.get("class_to_time"):  # The class vector is the context's mean: the context's width.
        cfg = dataclasses.replace(cfg, class_embed_type="projection",
                                  projection_class_embeddings_input_dim=cfg.cross_attention_dim)
    return cfg


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """The U-Net and the class conditioner, applied together."""

    unet: object
    cond: object
    labels: LabelSpace

    def __call__(self, params, x, t, labels, text_features=None):
        """Returns ``(eps, features)`` for images ``x`` ``[B,H,W,C]``, timesteps and labels ``[B]``."""
        context = self.cond.apply({"params": params["cond"]}, labels, text_features)  # [B, 1, D]
        return self.unet.apply({"params": params["unet"]}, x, t, context)

    def init(self, rng, *, image_size: int, channels: int, unet_params=None, text_features=None):
        """Fresh parameters ``{'unet', 'cond'}`` (``unet_params`` given: only the conditioner is new)."""
        from fadjax.models import unet as unet_lib
        k_unet, k_cond = jax.random.split(rng)
        if unet_params is None:
            unet_params = unet_lib.init_params(self.unet, k_unet, image_size=image_size)
        cond_params = self.cond.init(k_cond, jnp.zeros((1,), jnp.int32), text_features)["params"]
        return {"unet": unet_params, "cond": cond_params}

    def feature_shapes(self, *, image_size: int, channels: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the U-Net's named features for one image (no compute)."""
        x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.int32)
        ctx = jax.ShapeDtypeStruct((1, 1, self.unet.config.cross_attention_dim), jnp.float32)

        def f(x, t, ctx):
            params = self.unet.init(jax.random.key(0), x, t, ctx)
            return self.unet.apply(params, x, t, ctx)[1]

        return {k: tuple(v.shape) for k, v in jax.eval_shape(f, x, t, ctx).items()}


def unet(config):
    """The run's U-Net module: :func:`unet_config`'s architecture, the config's compute dtype and attention."""
    from fadjax.models import unet as unet_lib
    return unet_lib.UNet(unet_config(config, channels=config.data.channels), dtype=config_lib.compute_dtype(config),
                         attention=config.model.attention)


def build_diffusion_model(unet_module, *, cond_mode: str, labels: LabelSpace) -> DiffusionModel:
    """The U-Net (:func:`unet`, or one with pretrained weights) and a ``cond_mode`` conditioner over ``labels``."""
    from fadjax.models import conditioning
    cond = conditioning.ClassConditioner(mode=cond_mode, num_classes=labels.size,
                                         dim=unet_module.config.cross_attention_dim)
    return DiffusionModel(unet_module, cond, labels)


def null_padded(text_features: np.ndarray | None, labels: LabelSpace) -> np.ndarray | None:
    """Appends an all-zero row for the null label to per-row text features."""
    if text_features is None or not labels.has_null:
        return text_features
    return np.concatenate([text_features, np.zeros_like(text_features[:1])], 0)
