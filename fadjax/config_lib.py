"""Default configs of every stage and their validation.

The files in ``configs/`` build on these: ``configs/expert.py``, ``configs/baseline.py``,
``configs/feature_aligned.py`` and ``configs/dreambooth.py`` call :func:`expert_config` or
:func:`diffusion_config` and change a few fields. The defaults are the paper's
hyper-parameters (see ``docs`` and ``../shared/notes/reference_implementation.md``); the
``tiny`` variants shrink every size so that a run takes seconds on a CPU.

Optional fields use ``placeholder`` so that ``--config.field=value`` can set them from the
command line.
"""
from __future__ import annotations

import re

import ml_collections
from ml_collections.config_dict import placeholder

STAGES = ("expert", "diffusion")
PARALLEL = ("sharded", "pmap")
DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine", "cosine_epoch", "step_epoch")
EXPERT_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "vit_b16")
COND_MODES = ("class_embed", "clip")
EXPERT_INPUTS = ("noisy", "clean")
ALIGN_MODES = ("pooled", "tokens")  # fadjax.align.MODES
PROJECTORS = ("linear", "mlp")  # fadjax.align.PROJECTORS
SAMPLERS = ("ddpm", "ddim")
DATA_RANGES = ("[0,1]", "[-1,1]")  # fadjax.diffusion.DATA_RANGES
ATTENTIONS = ("auto", "cudnn", "xla", "chunked")  # fadjax.models.attention.ATTENTION_IMPLEMENTATIONS


def parse_variant(arg: str | None) -> set[str]:
    """Splits a config argument such as ``"tiny,clean"`` into a set of variant names."""
    return {a.strip() for a in (arg or "").split(",") if a.strip()}


def _data(image_size: int) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # Where the images come from: "folder:PATH" (one folder per class), "tfds:NAME" (downloaded by
    # TFDS, e.g. "tfds:colorectal_histology", the paper's dataset) or "demo". No default: nothing is
    # downloaded unless you name it (the tiny variants use "demo").
    d.source = placeholder(str)
    d.image_size = image_size  # Square side the images are resized to (pixels).
    d.channels = 1  # 1 = grayscale (PIL "L" luma, as the paper), 3 = RGB.
    d.classes = placeholder(str)  # Comma-separated class names to keep; None keeps all.
    d.max_per_class = placeholder(int)  # Use at most this many images per class (first in file order); None = all.
    d.val_fraction = 0.2  # Validation share of the stratified split (the paper's 80/20).
    d.split_seed = 0  # Seed of the train/validation split (same split on every machine).
    d.skip_bad_files = False  # Skip undecodable images (listed in a warning) instead of stopping.
    d.cache = placeholder(str)  # .npz cache of the decoded arrays; None = <workdir>/data_cache.npz.
    d.data_dir = placeholder(str)  # TFDS data_dir.
    d.manual_dir = placeholder(str)  # TFDS manual_dir (a manually placed archive, offline).
    d.hflip = True  # Random horizontal flips during training.
    d.vflip = True  # Random vertical flips during training.
    return d


def _optim(lr: float, schedule: str) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.lr = lr  # Peak learning rate of Adam.
    o.b1 = 0.9  # Adam beta1.
    o.b2 = 0.999  # Adam beta2.
    o.eps = 1e-8  # Adam epsilon.
    o.weight_decay = 0.0  # Decoupled weight decay (AdamW) when > 0.
    # "constant", "cosine" (per step), "cosine_epoch" (cosine annealing stepped once per epoch,
    # as torch CosineAnnealingLR(T_max=epochs) in the reference) or "step_epoch" (StepLR).
    o.schedule = schedule
    o.step_gamma = 0.7  # "step_epoch": multiply the lr by this after every epoch.
    o.warmup_steps = 0  # Linear warm-up steps before the schedule.
    o.grad_clip_norm = placeholder(float)  # Clip the global gradient norm; None = no clipping.
    return o


def _train(batch_size: int, num_epochs: int | None) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.batch_size = batch_size  # Global batch size (split over all devices of all processes).
    t.num_epochs = placeholder(int) if num_epochs is None else num_epochs  # Run length in epochs ...
    t.num_steps = placeholder(int)  # ... or in optimizer steps (set exactly one of the two).
    t.log_every = 50  # Steps between metric logs (metrics.jsonl, TensorBoard, non-finite check).
    t.checkpoint_every = 1000  # Steps between checkpoints (and one at the end).
    t.keep_checkpoints = 3  # Number of most recent checkpoints kept.
    t.progress = True  # Progress bar with ETA on a terminal (process 0).
    # Resume a workdir even though this config changes what it trained (model, data, optimizer, seed,
    # ...); the changes are recorded in run.json. False: such a rerun stops naming each changed field.
    t.allow_config_change = False
    return t


def expert_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The expert classifier stage (paper §V-A): ResNet50, 224x224x1, Adam 1e-4, StepLR 0.7."""
    variants = parse_variant(arg)
    c = ml_collections.ConfigDict()
    c.stage = "expert"
    c.seed = 0  # Seed of initialisation, data order and augmentation.
    c.parallel = "sharded"  # "sharded" (jit over a device mesh) or "pmap".
    c.num_devices = placeholder(int)  # Use only the first N devices; None = all of them.
    c.dtype = "float32"  # Compute dtype ("bfloat16" for mixed precision; params stay float32).
    c.data = _data(224)
    c.expert = ml_collections.ConfigDict()
    c.expert.arch = "resnet50"  # One of resnet18/34/50/101, vit_b16.
    c.expert.width = 64  # Stem width of the ResNet (64 = standard; smaller for tiny runs).
    c.expert.head_hidden = 256  # Hidden units of the paper's head Linear(D,256)-ReLU-Linear(256,K).
    c.expert.pretrained = placeholder(str)  # Local transformers ResNet folder or hub id (ImageNet init).
    c.optim = _optim(1e-4, "step_epoch")
    c.train = _train(64, 15)  # Paper: 15 epochs (the reference config uses 10).
    c.train.log_every = 20
    c.train.checkpoint_every = 500
    c.train.eval_every_epoch = 1  # Validate (and keep the best checkpoint) every N epochs.
    c.train.eval_batch_size = 128  # Batch size of validation passes.
    if "tiny" in variants:
        c.data.source = "demo"
        c.data.image_size = 32
        c.expert.arch = "resnet18"
        c.expert.width = 8
        c.expert.head_hidden = 16
        c.train.batch_size = 16
        c.train.num_epochs = 2
        c.optim.lr = 1e-3  # From scratch and only a few steps: a larger step than the paper's fine-tuning rate.
        c.train.log_every = 5
        c.train.checkpoint_every = 20
        c.train.eval_batch_size = 64
    return c


def diffusion_config(arg: str | None = None, *, align: bool) -> ml_collections.ConfigDict:
    """The diffusion stage (paper §III-§V-B), feature-aligned when ``align``; the baseline otherwise."""
    variants = parse_variant(arg)
    c = ml_collections.ConfigDict()
    c.stage = "diffusion"
    c.seed = 0  # Seed of initialisation, data order, noise and timesteps.
    c.parallel = "sharded"  # "sharded" (jit over a device mesh) or "pmap".
    c.num_devices = placeholder(int)  # Use only the first N devices; None = all of them.
    c.dtype = "float32"  # Compute dtype ("bfloat16": bf16 activations, float32 params and Adam state).
    c.init_from = placeholder(str)  # Start from this diffusion run's workdir (fine-tuning, DreamBooth).
    c.data = _data(64)

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny_sd"  # U-Net architecture preset (segmind/tiny-sd, BK-SDM-Tiny).
    c.model.block_out_channels = placeholder(str)  # Override, e.g. "32,64,64"; None = preset's.
    c.model.attention_head_dim = placeholder(int)  # Override of the number of heads; None = preset's.
    c.model.cross_attention_dim = placeholder(int)  # Override of the context width; None = preset's.
    c.model.norm_num_groups = placeholder(int)  # Override of GroupNorm groups; None = preset's.
    # Levels (0 = the first, full-resolution one) whose blocks carry the transformer (self- and
    # cross-attention, through which the class conditioning enters), e.g. "2" or "1,2";
    # None = every level (tiny-sd). The other levels use plain ResNet blocks (DownBlock2D/UpBlock2D).
    c.model.attention_levels = placeholder(str)
    c.model.layers_per_block = placeholder(int)  # Override of ResNet layers per block; None = preset's (1).
    c.model.pretrained = placeholder(str)  # Local diffusers U-Net folder or hub id ("segmind/tiny-sd").
    c.model.attention = "auto"  # "auto", "cudnn" (fused flash attention on GPU), "xla" or "chunked" (bounded memory).

    c.cond = ml_collections.ConfigDict()
    c.cond.mode = "class_embed"  # "class_embed" (learned table) or "clip" (the paper's CLIP text features).
    c.cond.clip_path = placeholder(str)  # Local CLIP folder (or hub id) for mode "clip".
    c.cond.prompt = "{}"  # Text per class for "clip"; "{}" is replaced by the class name.
    c.cond.label_dropout = 0.0  # Probability of the null label in training (enables classifier-free guidance).

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.num_train_timesteps = 1000  # DDPM steps T.
    c.diffusion.beta_schedule = "squaredcos_cap_v2"  # The paper's cosine schedule.
    c.diffusion.max_train_timestep = 999  # t ~ U{0, ..., max-1}; the reference never draws 999.
    c.diffusion.loss_weight = 1.0  # w1: weight of the noise-prediction MSE.
    # Range the images are diffused in: "[0,1]" as the reference code feeds them, or "[-1,1]" (the
    # usual DDPM practice, matching the samplers' clip of the predicted x0 to [-1, 1]). Data and
    # samples stay in [0, 1] outside the model; the expert always sees its own [0, 1] range.
    c.diffusion.data_range = "[0,1]"

    c.align = ml_collections.ConfigDict()
    c.align.enabled = align  # Feature alignment on (False = the baseline).
    c.align.weight = 1.0  # w2: weight of the alignment loss.
    c.align.expert_workdir = placeholder(str)  # Workdir of the trained expert (required when enabled) ...
    c.align.train_missing_expert = False  # ... unless this is set: then a tiny expert is trained in <workdir>/expert first.
    # U-Net feature aligned to the expert: "down_2_shortcut" is the reference code's hook
    # (down_blocks.2.resnets.0.conv_shortcut); "down_2" is the last down block's output.
    c.align.unet_feature = "down_2_shortcut"
    # Any named U-Net feature: down_{i}, down_{i}_shortcut, mid (with a mid block), up_{i} (up block i's output).
    c.align.expert_feature = "pooled"  # Expert feature: "pooled" (2048-d for ResNet50) or a spatial stage_{s} / block_{i}.
    # "pooled": the paper, one pooled vector per image, the projector maps the expert's to the U-Net's width.
    # "tokens": REPA-style, a cosine per spatial position on one grid, the projector maps the U-Net's
    # tokens to the expert's width (needs a spatial expert_feature). See fadjax/align.py.
    c.align.mode = "pooled"
    c.align.projector = "linear"  # "linear" (the paper's W_p) or "mlp" (REPA's Linear-SiLU-Linear-SiLU-Linear).
    c.align.projector_hidden = 256  # Hidden width of the "mlp" projector (REPA: 2048).
    c.align.expert_input = "noisy"  # "noisy": expert sees x_t (the paper); "clean": x0 (Table I ablation).
    c.align.expert_resize = placeholder(int)  # Resize the expert's input to this size; None = as is (the reference).

    c.optim = _optim(1e-4, "cosine_epoch")
    c.train = _train(4, 20)
    c.train.log_every = 50
    c.train.checkpoint_every = 2000
    c.train.ema_decay = placeholder(float)  # EMA of the parameters (e.g. 0.999); None = no EMA.
    # EMA warm-up: the decay at step t is min(ema_decay, (1 + t) / (10 + t)), so a short run's EMA is
    # not mostly its initialisation (False: the fixed decay from step 0).
    c.train.ema_warmup = True

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddpm"  # "ddpm" (all training steps, the paper) or "ddim".
    c.sample.steps = placeholder(int)  # Sampling steps (None = all training steps for DDPM, 50 for DDIM).
    c.sample.num_per_class = 10  # Images per class and seed (the paper: 10).
    c.sample.seeds = "0-14"  # Seeds shared by every compared model (the paper: 15).
    c.sample.exclude_classes = "empty"  # Comma-separated classes not generated (the paper drops "empty").
    c.sample.guidance_scale = 1.0  # Classifier-free guidance (needs cond.label_dropout > 0 in training).
    c.sample.batch_size = 70  # Images per compiled sampling call.

    if "clean" in variants:
        c.align.expert_input = "clean"
    if "tiny" in variants:
        c.align.train_missing_expert = True  # The CPU demo runs on its own: a tiny expert is trained first.
        c.data.source = "demo"
        c.data.image_size = 16
        c.model.block_out_channels = "16,32,64"
        c.model.attention_head_dim = 2
        c.model.cross_attention_dim = 16
        c.model.norm_num_groups = 8
        c.train.batch_size = 8
        c.train.num_epochs = None
        c.train.num_steps = 6
        c.train.log_every = 2
        c.train.checkpoint_every = 3
        c.optim.lr = 1e-3
        c.optim.schedule = "cosine"
        c.sample.steps = 10
        c.sample.sampler = "ddim"
        c.sample.num_per_class = 3
        c.sample.seeds = "0-1"
        c.sample.batch_size = 16
    return c


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


def parse_int_list(s: str | None) -> tuple[int, ...] | None:
    """``"32,64,64"`` -> ``(32, 64, 64)``; None stays None."""
    if s is None:
        return None
    return tuple(int(v) for v in str(s).replace(" ", "").split(",") if v)


def parse_names(s: str | None) -> list[str] | None:
    """``"tumor, stroma"`` -> ``["tumor", "stroma"]``; None or "" -> None."""
    if s is None:
        return None
    names = [v.strip().lower() for v in str(s).split(",") if v.strip()]
    return names or None


def parse_seeds(spec: str | int) -> list[int]:
    """``"0-14"`` -> 0..14, ``"0,3,5"`` -> [0, 3, 5], ``"4"`` -> [4]."""
    out: list[int] = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range {part!r} is empty")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            out.append(int(part))
        else:
            raise ValueError(f"cannot parse seeds {spec!r}: expected e.g. '0-14' or '0,3,5'")
    if not out:
        raise ValueError(f"no seeds in {spec!r}")
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Rejects values that cannot work, before anything is built or compiled.

    Raises:
      ConfigError: naming the field and what is wrong with it.
    """
    _check(config.stage in STAGES, "stage", f"{config.stage!r} is not one of {STAGES}")
    _check(config.parallel in PARALLEL, "parallel", f"{config.parallel!r} is not one of {PARALLEL}")
    _check(config.num_devices is None or config.num_devices >= 1, "num_devices",
           f"{config.num_devices} must be >= 1")
    _check(config.dtype in DTYPES, "dtype", f"{config.dtype!r} is not one of {DTYPES}")
    d = config.data
    _check(isinstance(d.source, str) and bool(d.source), "data.source",
           "no data source: pass --config.data.source=folder:/path/to/tiles (one folder per class), "
           "tfds:colorectal_histology (downloads the paper's dataset) or demo")
    _check(d.image_size >= 8, "data.image_size", f"{d.image_size} is too small (>= 8)")
    _check(d.channels in (1, 3), "data.channels", f"{d.channels} must be 1 or 3")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"{d.val_fraction} must be in (0, 1)")
    t = config.train
    _check((t.num_epochs is None) != (t.num_steps is None), "train.num_epochs",
           f"set exactly one of train.num_epochs ({t.num_epochs}) and train.num_steps ({t.num_steps})")
    for f in ("num_epochs", "num_steps"):
        v = t[f]
        _check(v is None or v > 0, f"train.{f}", f"{v} must be > 0")
    _check(t.batch_size > 0, "train.batch_size", f"{t.batch_size} must be > 0")
    _check(t.log_every > 0, "train.log_every", f"{t.log_every} must be > 0")
    _check(t.checkpoint_every > 0, "train.checkpoint_every", f"{t.checkpoint_every} must be > 0")
    o = config.optim
    _check(o.lr > 0, "optim.lr", f"{o.lr} must be > 0")
    _check(o.schedule in LR_SCHEDULES, "optim.schedule", f"{o.schedule!r} is not one of {LR_SCHEDULES}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"{o.weight_decay} must be >= 0")
    if config.stage == "expert":
        _check(config.expert.arch in EXPERT_ARCHS, "expert.arch", f"{config.expert.arch!r} is not one of {EXPERT_ARCHS}")
        return
    _check(config.model.attention in ATTENTIONS, "model.attention",
           f"{config.model.attention!r} is not one of {ATTENTIONS}")
    _check(config.cond.mode in COND_MODES, "cond.mode", f"{config.cond.mode!r} is not one of {COND_MODES}")
    _check(config.cond.mode != "clip" or config.cond.clip_path, "cond.clip_path",
           "mode 'clip' needs a local CLIP folder (or a hub id such as openai/clip-vit-base-patch32)")
    _check(0.0 <= config.cond.label_dropout < 1.0, "cond.label_dropout", f"{config.cond.label_dropout} must be in [0, 1)")
    df = config.diffusion
    _check(0 < df.max_train_timestep <= df.num_train_timesteps, "diffusion.max_train_timestep",
           f"{df.max_train_timestep} must be in (0, {df.num_train_timesteps}]")
    _check(df.loss_weight >= 0, "diffusion.loss_weight", f"{df.loss_weight} must be >= 0")
    _check(df.get("data_range", "[0,1]") in DATA_RANGES, "diffusion.data_range",
           f"{df.get('data_range')!r} is not one of {DATA_RANGES}")
    m = config.model
    try:
        levels = parse_int_list(m.get("attention_levels"))
        channels = parse_int_list(m.block_out_channels)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    n_levels = len(channels) if channels else 3
    _check(levels is None or all(0 <= v < n_levels for v in levels), "model.attention_levels",
           f"{m.get('attention_levels')!r}: levels must be in 0..{n_levels - 1} ({n_levels} U-Net levels)")
    _check(m.get("layers_per_block") is None or m.layers_per_block >= 1, "model.layers_per_block",
           f"{m.get('layers_per_block')} must be >= 1")
    a = config.align
    _check(a.weight >= 0, "align.weight", f"{a.weight} must be >= 0")
    _check(a.expert_input in EXPERT_INPUTS, "align.expert_input", f"{a.expert_input!r} is not one of {EXPERT_INPUTS}")
    _check(a.get("mode", "pooled") in ALIGN_MODES, "align.mode", f"{a.get('mode')!r} is not one of {ALIGN_MODES}")
    _check(a.get("projector", "linear") in PROJECTORS, "align.projector",
           f"{a.get('projector')!r} is not one of {PROJECTORS}")
    _check(a.get("projector_hidden", 256) >= 1, "align.projector_hidden", f"{a.get('projector_hidden')} must be >= 1")
    _check(not (a.get("mode") == "tokens" and a.expert_feature == "pooled"), "align.expert_feature",
           "align.mode='tokens' aligns spatial maps: choose a spatial expert feature (e.g. stage_2), not 'pooled'")
    if a.enabled:
        _check(bool(a.expert_workdir) or a.get("train_missing_expert", False), "align.expert_workdir",
               "feature alignment needs a trained expert: train one with `python train.py "
               "--config configs/expert.py --workdir runs/expert`, then pass --config.align.expert_workdir=runs/expert")
    s = config.sample
    _check(s.sampler in SAMPLERS, "sample.sampler", f"{s.sampler!r} is not one of {SAMPLERS}")
    try:
        parse_seeds(s.seeds)
    except ValueError as e:
        raise ConfigError(f"config.sample.seeds: {e}") from None
