"""The expert: a classifier whose features the U-Net's down path is aligned to.

`ResNet` (depth 18/34/50/101, any width, any number of input channels) loads the weights of a
transformers ResNet folder (`microsoft/resnet-50` format) with `from_pretrained`; `ViT` is
random-init only. Both are NHWC, take images in [0, 1] (no ImageNet normalisation, as the
paper) and return `(logits or None, features)` where `features['pooled']` is the `[B, D]`
vector the alignment projects.

Parameter layout of `ResNet` (what `from_pretrained` fills)::

    stem/conv, stem/bn                          embedder conv 7x7/2 + BN (+ ReLU, max-pool 3x3/2)
    stage_{s}/block_{b}/conv_{k}/{conv,bn}      k = 0..1 (basic) or 0..2 (bottleneck)
    stage_{s}/block_{b}/shortcut/{conv,bn}      when the block changes width or stride
    head/hidden, head/out                       the paper's Linear(D, 256) -> ReLU -> Linear(256, K)
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from fadjax.models import weights

# PyTorch BatchNorm2d defaults: momentum 0.1 weighs the new batch, i.e. 0.9 on the running average.
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5
# torchvision / transformers ResNet conv init: kaiming normal, fan_out, ReLU gain.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_BOTTLENECK_EXPANSION = 4

_RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class ConvBN(nn.Module):
    """Bias-free conv with PyTorch's symmetric `k // 2` padding, then BatchNorm, then optional ReLU."""

    features: int
    kernel_size: int
    stride: int = 1
    relu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        pad = self.kernel_size // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=_CONV_INIT,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, dtype=self.dtype, name="bn"
        )(x)
        return nn.relu(x) if self.relu else x


class ResidualBlock(nn.Module):
    """A basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) residual block, transformers' layout.

    The bottleneck's inner width is `features // 4`; its stride sits in the 3x3 conv unless
    `downsample_in_bottleneck` (then in the first 1x1 conv). A 1x1 conv + BN shortcut is used
    when the block changes the width or the resolution.
    """

    features: int
    block: str
    stride: int = 1
    downsample_in_bottleneck: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        residual = x
        if self.block == "basic":
            y = ConvBN(self.features, 3, self.stride, dtype=self.dtype, name="conv_0")(x, train=train)
            y = ConvBN(self.features, 3, relu=False, dtype=self.dtype, name="conv_1")(y, train=train)
        else:
            inner = self.features // _BOTTLENECK_EXPANSION
            s0, s1 = (self.stride, 1) if self.downsample_in_bottleneck else (1, self.stride)
            y = ConvBN(inner, 1, s0, dtype=self.dtype, name="conv_0")(x, train=train)
            y = ConvBN(inner, 3, s1, dtype=self.dtype, name="conv_1")(y, train=train)
            y = ConvBN(self.features, 1, relu=False, dtype=self.dtype, name="conv_2")(y, train=train)
        if x.shape[-1] != self.features or self.stride != 1:
            residual = ConvBN(self.features, 1, self.stride, relu=False, dtype=self.dtype, name="shortcut")(
                x, train=train
            )
        return nn.relu(y + residual)


class Stage(nn.Module):
    """`num_blocks` residual blocks; the first one carries the stride (and the width change)."""

    features: int
    num_blocks: int
    block: str
    stride: int = 2
    downsample_in_bottleneck: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for b in range(self.num_blocks):
            x = ResidualBlock(
                self.features,
                self.block,
                self.stride if b == 0 else 1,
                self.downsample_in_bottleneck,
                dtype=self.dtype,
                name=f"block_{b}",
            )(x, train=train)
        return x


class ClassifierHead(nn.Module):
    """The paper's head: Linear(D, hidden) -> ReLU -> Linear(hidden, K); one Linear when hidden is None."""

    num_classes: int
    hidden: int | None = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        x = pooled
        if self.hidden is not None:
            x = nn.relu(nn.Dense(self.hidden, kernel_init=_LINEAR_INIT, dtype=self.dtype, name="hidden")(x))
        x = nn.Dense(self.num_classes, kernel_init=_LINEAR_INIT, dtype=self.dtype, name="out")(x)
        return x.astype(jnp.float32)  # [B, K]


class ResNet(nn.Module):
    """ResNet v1.5 (transformers layout) returning logits and named features.

    Attributes:
      stage_sizes: Number of blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: 'basic' or 'bottleneck'.
      width: Stem width; stage output widths default to width * [1, 2, 4, 8] (times 4 for bottleneck).
      num_classes: Classes of the head; None returns no logits (feature extractor).
      head_hidden: Hidden width of the head; None for a single Linear.
      stage_widths: Output channels of each stage, overriding the default from `width`
        (transformers' `hidden_sizes`).
      downsample_in_first_stage: Stride 2 in the first stage too (transformers config flag).
      downsample_in_bottleneck: Stride in the bottleneck's first 1x1 conv instead of its 3x3.
      dtype: Computation dtype (parameters stay float32).
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    width: int = 64
    num_classes: int | None = None
    head_hidden: int | None = 256
    stage_widths: Sequence[int] | None = None
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    dtype: Any = jnp.float32

    @property
    def resolved_stage_widths(self) -> tuple[int, ...]:
        """Output channels of each stage."""
        if self.stage_widths is not None:
            return tuple(self.stage_widths)
        expansion = _BOTTLENECK_EXPANSION if self.block == "bottleneck" else 1
        return tuple(self.width * 2**i * expansion for i in range(len(self.stage_sizes)))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array | None, dict[str, jax.Array]]:
        """Runs the network.

        Args:
          x: Images `[B, H, W, C]` in [0, 1].
          train: Batch statistics (apply with `mutable=['batch_stats']`) instead of running averages.

        Returns:
          `(logits [B, K] float32 or None, features)`; features hold `stem` (after the max-pool),
          `stage_1`.. (NHWC) and `pooled` `[B, D]`.
        """
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        widths = self.resolved_stage_widths
        if len(widths) != len(self.stage_sizes):
            raise ValueError(f"{len(widths)} stage widths for {len(self.stage_sizes)} stages")
        features = {}
        x = ConvBN(self.width, 7, 2, dtype=self.dtype, name="stem")(x.astype(self.dtype), train=train)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features["stem"] = x  # [B, H/4, W/4, width]
        for s, (num_blocks, features_out) in enumerate(zip(self.stage_sizes, widths)):
            stride = 2 if s > 0 or self.downsample_in_first_stage else 1
            x = Stage(
                features_out,
                num_blocks,
                self.block,
                stride,
                self.downsample_in_bottleneck,
                dtype=self.dtype,
                name=f"stage_{s + 1}",
            )(x, train=train)
            features[f"stage_{s + 1}"] = x  # [B, h, w, features_out]
        pooled = jnp.mean(x, axis=(1, 2))  # [B, D]
        features["pooled"] = pooled
        logits = None
        if self.num_classes is not None:
            logits = ClassifierHead(self.num_classes, self.head_hidden, dtype=self.dtype, name="head")(pooled)
        return logits, features


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)) with exact GELU."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        deterministic = not train or self.dropout == 0.0
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="ln_1")(x)
        y = nn.MultiHeadDotProductAttention(
            self.num_heads, dtype=self.dtype, dropout_rate=self.dropout, deterministic=deterministic, name="attn"
        )(y, y)
        x = x + nn.Dropout(self.dropout, deterministic=deterministic)(y)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="ln_2")(x)
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dropout(self.dropout, deterministic=deterministic)(y)
        y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(y)
        return x + nn.Dropout(self.dropout, deterministic=deterministic)(y)


class ViT(nn.Module):
    """Vision Transformer (ViT-B/16 by default), class token, pre-LN. Random init only (no loader).

    The position embedding is sized from the input at init (image side / patch side squared, plus
    the class token), so a model is tied to the image size it was initialised with.

    Attributes:
      num_classes: Classes of the head; None returns no logits.
      patch_size: Patch side in pixels.
      dim: Token width.
      depth: Number of encoder blocks.
      num_heads: Attention heads.
      mlp_dim: Hidden width of the MLPs.
      head_hidden: Hidden width of the head; None for a single Linear.
      dropout: Dropout rate in train mode (needs a 'dropout' rng when > 0).
      dtype: Computation dtype.
    """

    num_classes: int | None = None
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    head_hidden: int | None = 256
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array | None, dict[str, jax.Array]]:
        """Runs the network.

        Args:
          x: Images `[B, H, W, C]` in [0, 1], H and W multiples of `patch_size`.
          train: Enables dropout.

        Returns:
          `(logits [B, K] float32 or None, features)`; features hold `stem` (patch embeddings,
          `[B, H/p, W/p, dim]`), `block_1`.. (patch tokens of each block as a grid) and `pooled`
          (final-LN class token, `[B, dim]`).
        """
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed")(
            x.astype(self.dtype)
        )
        b, h, w, d = x.shape
        features = {"stem": x}
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(self.dtype), x.reshape(b, h * w, d)], 1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + h * w, d))
        tokens = tokens + pos.astype(self.dtype)  # [B, 1 + N, D]
        for i in range(self.depth):
            tokens = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, self.dtype, name=f"block_{i + 1}")(
                tokens, train=train
            )
            features[f"block_{i + 1}"] = tokens[:, 1:].reshape(b, h, w, d)
        pooled = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="ln_final")(tokens[:, 0])  # [B, D]
        features["pooled"] = pooled
        logits = None
        if self.num_classes is not None:
            logits = ClassifierHead(self.num_classes, self.head_hidden, dtype=self.dtype, name="head")(pooled)
        return logits, features


def resnet(depth: int, **kw) -> ResNet:
    """ResNet-18/34/50/101 by depth; keyword arguments override `ResNet` fields (e.g. width=8)."""
    if depth not in _RESNET_LAYOUTS:
        raise ValueError(f"ResNet depth must be one of {sorted(_RESNET_LAYOUTS)}, got {depth}")
    block, stage_sizes = _RESNET_LAYOUTS[depth]
    return ResNet(stage_sizes=kw.pop("stage_sizes", stage_sizes), block=kw.pop("block", block), **kw)


def build_expert(arch: str, *, num_classes: int | None, dtype: Any = jnp.float32, **kw) -> nn.Module:
    """Builds an expert by name.

    Args:
      arch: 'resnet18', 'resnet34', 'resnet50', 'resnet101' or 'vit_b16'.
      num_classes: Classes of the head; None for a feature extractor.
      dtype: Computation dtype.
      **kw: Overrides of the module's fields (e.g. width=8, or dim/depth for a tiny ViT).

    Returns:
      The (unbound) module.
    """
    match = re.fullmatch(r"resnet(\d+)", arch)
    if match:
        return resnet(int(match.group(1)), num_classes=num_classes, dtype=dtype, **kw)
    if arch == "vit_b16":
        return ViT(num_classes=num_classes, dtype=dtype, **kw)
    raise ValueError(f"unknown expert arch {arch!r}; expected resnet18/34/50/101 or vit_b16")


def init_expert(module: nn.Module, rng: jax.Array, *, image_size: int, in_channels: int) -> dict[str, Any]:
    """Random variables (`{'params'}`, plus `{'batch_stats'}` for a ResNet) for square images."""
    x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
    return jax.jit(lambda r: module.init(r, x, train=False))(rng)


def feature_dim(module: nn.Module) -> int:
    """Width D of `features['pooled']`."""
    if isinstance(module, ResNet):
        return module.resolved_stage_widths[-1]
    if isinstance(module, ViT):
        return module.dim
    raise TypeError(f"not an expert module: {type(module).__name__}")


# ----------------------------------------------------------------------------------------------
# transformers ResNet -> ResNet.

_BN_LEAVES = {
    "normalization.weight": ("params", "bn", "scale"),
    "normalization.bias": ("params", "bn", "bias"),
    "normalization.running_mean": ("batch_stats", "bn", "mean"),
    "normalization.running_var": ("batch_stats", "bn", "var"),
    "convolution.weight": ("params", "conv", "kernel"),
}


def _flax_path(key: str) -> tuple[str, ...] | None:
    """(collection, *module path, leaf) for a transformers ResNetModel key; None when unknown."""
    m = re.fullmatch(r"embedder\.embedder\.(.+)", key)
    if m:
        prefix, rest = ("stem",), m.group(1)
    else:
        m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(layer\.(\d+)|shortcut)\.(.+)", key)
        if not m:
            return None
        unit = "shortcut" if m.group(3) == "shortcut" else f"conv_{m.group(4)}"
        prefix, rest = (f"stage_{int(m.group(1)) + 1}", f"block_{m.group(2)}", unit), m.group(5)
    if rest not in _BN_LEAVES:
        return None
    collection, module, leaf = _BN_LEAVES[rest]
    return (collection, *prefix, module, leaf)


def _resnet_from_config(config: dict[str, Any], **kw) -> ResNet:
    if config.get("model_type") != "resnet":
        raise ValueError(f"not a transformers ResNet config (model_type={config.get('model_type')!r})")
    if config.get("hidden_act", "relu") != "relu":
        raise ValueError(f"only ReLU ResNets are supported, config has hidden_act={config['hidden_act']!r}")
    return ResNet(
        stage_sizes=tuple(config.get("depths", (3, 4, 6, 3))),
        block=config.get("layer_type", "bottleneck"),
        width=config.get("embedding_size", 64),
        stage_widths=tuple(config.get("hidden_sizes", (256, 512, 1024, 2048))),
        downsample_in_first_stage=config.get("downsample_in_first_stage", False),
        downsample_in_bottleneck=config.get("downsample_in_bottleneck", False),
        **kw,
    )


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def from_pretrained(
    path: str | os.PathLike,
    *,
    in_channels: int | None = None,
    num_classes: int | None = None,
    allow_pickle: bool = False,
    head_hidden: int | None = 256,
    dtype: Any = jnp.float32,
    rng: jax.Array | None = None,
) -> tuple[ResNet, dict[str, Any]]:
    """A `ResNet` and its variables from a transformers ResNet folder (no torch for safetensors).

    Reads `config.json` (model_type resnet: depths, hidden_sizes, layer_type, embedding_size,
    num_channels, downsample flags) and `model.safetensors` of a `ResNetModel` or a
    `ResNetForImageClassification` (keys prefixed `resnet.`; its ImageNet classifier is dropped).

    Args:
      path: Local folder, or a hub id "org/name" (downloaded only when it is not a local path).
      in_channels: Input channels; when it differs from the checkpoint's `num_channels` the stem
        conv starts from a fresh init (the paper's 1-channel expert). None keeps the checkpoint's.
      num_classes: Adds a fresh head Linear(D, head_hidden) -> ReLU -> Linear(head_hidden, K).
      allow_pickle: Accept a pickled `pytorch_model.bin` (needs torch).
      head_hidden: Hidden width of the fresh head; None for a single Linear.
      dtype: Computation dtype.
      rng: Key for the fresh parts (stem conv, head); defaults to PRNGKey(0).

    Returns:
      `(module, {'params', 'batch_stats'})`.

    Raises:
      FileNotFoundError: missing folder, config.json or weights.
      ValueError: pickled weights without `allow_pickle`, a non-ResNet config, or checkpoint
        tensors that do not match the model (unused, missing or mis-shaped keys are listed).
    """
    directory = weights.resolve_checkpoint_dir(
        path, allow_patterns=["config.json"] + weights.TRANSFORMERS.patterns
        + ([weights.TRANSFORMERS.pickle] if allow_pickle else []))
    files = weights.find_weights(directory, allow_pickle=allow_pickle)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    module = _resnet_from_config(config, num_classes=num_classes, head_hidden=head_hidden, dtype=dtype)
    ckpt_channels = config.get("num_channels", 3)
    in_channels = ckpt_channels if in_channels is None else in_channels
    fresh_stem = in_channels != ckpt_channels

    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, in_channels)), train=False)
    )
    expected = {
        tuple(getattr(k, "key", k) for k in kp): leaf.shape for kp, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    }
    variables: dict[str, Any] = {}
    unused, mismatched, dropped = [], [], []
    for key, value in weights.read_weights(files).items():
        key = key.removeprefix("resnet.")
        if key.startswith("classifier.") or key.endswith("num_batches_tracked"):
            dropped.append(key)
            continue
        target = _flax_path(key)
        if target is None or target not in expected:
            unused.append(key)
            continue
        if target[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
        if fresh_stem and target[1] == "stem" and target[-1] == "kernel":
            dropped.append(key)
            continue
        if value.shape != expected[target]:
            mismatched.append(f"{key}: checkpoint {value.shape} vs model {expected[target]} ({'/'.join(target)})")
            continue
        _set(variables, target, jnp.asarray(value))

    kernel_path = ("params", "stem", "conv", "kernel")
    head = ClassifierHead(num_classes, head_hidden, dtype=dtype) if num_classes is not None else None

    @jax.jit
    def fresh_init(rng: jax.Array) -> dict[str, Any]:
        stem_rng, head_rng = jax.random.split(rng)
        fresh = {}
        if fresh_stem:
            fresh["stem"] = _CONV_INIT(stem_rng, expected[kernel_path], jnp.float32)
        if head is not None:
            fresh["head"] = head.init(head_rng, jnp.zeros((1, feature_dim(module))))["params"]
        return fresh

    fresh = fresh_init(jax.random.PRNGKey(0) if rng is None else rng) if fresh_stem or head is not None else {}
    if fresh_stem:
        logging.info(
            "Expert stem conv: %d input channels instead of the checkpoint's %d; it starts from a fresh init.",
            in_channels,
            ckpt_channels,
        )
        _set(variables, kernel_path, fresh["stem"])
    if head is not None:
        logging.info("Expert head: fresh Linear(%d, %s) -> %d classes.", feature_dim(module), head_hidden, num_classes)
        variables["params"]["head"] = fresh["head"]

    loaded = {tuple(getattr(k, "key", k) for k in kp) for kp, _ in jax.tree_util.tree_leaves_with_path(variables)}
    missing = sorted("/".join(p) for p in expected if p not in loaded)
    if unused or missing or mismatched:
        raise ValueError(
            f"checkpoint {directory} does not match the ResNet its config describes:\n"
            f"  unused checkpoint tensors: {unused}\n  missing model variables: {missing}\n"
            f"  mismatched shapes: {mismatched}"
        )
    if dropped:
        logging.info("Expert checkpoint: not loaded (by design): %s", dropped)
    logging.info(
        "Loaded expert %s: %s blocks %s, widths %s, D=%d.",
        directory,
        module.block,
        list(module.stage_sizes),
        list(module.resolved_stage_widths),
        feature_dim(module),
    )
    return module, variables
