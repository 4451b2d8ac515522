"""Baseline diffusion (paper §V-B): the tiny-sd U-Net in pixel space, no feature alignment.

Every field of the diffusion stage lives here; ``feature_aligned.py`` and ``dreambooth.py`` start
from it.

  python train.py --config configs/baseline.py --workdir runs/baseline \
      --config.data.source=folder:/path/to/tiles
  python train.py --config configs/baseline.py:tiny --workdir /tmp/base   # seconds on a CPU

Variants (after the colon, comma-separated):
  tiny      seconds on a CPU (demo data, 16 px, a 3-level U-Net of width 16);
  cpu       `fadjax.reproduce --preset cpu`: the real tiles at 32 px on 2 CPU cores;
  fast      `--preset fast`: 64 px on one GPU;
  demo      `--preset tiny` (README's first command), on top of tiny;
  micro     `--preset micro` (the tests), on top of tiny;
  pretrain  the shared pre-training of the cpu and demo sizes (every model of the preset starts from it).
"""
import ml_collections
from ml_collections.config_dict import placeholder

from fadjax import config_lib

common = config_lib.config_module("common", beside=__file__)


def get_config(arg=None):
    variants = common.variants(arg)
    c = ml_collections.ConfigDict()
    c.stage = "diffusion"
    c.seed = 0  # Seed of initialisation, data order, noise and timesteps.
    c.parallel = "sharded"  # "sharded" (jit over a device mesh) or "pmap".
    c.num_devices = placeholder(int)  # Use only the first N devices; None = all of them.
    c.dtype = "float32"  # Compute dtype ("bfloat16": bf16 activations, float32 params and Adam state).
    c.init_from = placeholder(str)  # Start from this diffusion run's workdir (fine-tuning, DreamBooth).
    c.data = common.data(64)

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
    # The class also added to the time embedding (diffusers' class_embed_type "projection"), so it
    # reaches every ResNet block; False = through cross-attention only (tiny-sd, the paper).
    c.model.class_to_time = False
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
    # What the U-Net predicts: "epsilon" (the noise; DDPM, the paper) or "v_prediction" (Salimans & Ho 2022,
    # v = sqrt(abar) eps - sqrt(1-abar) x0). Every sampler reads the run's choice.
    c.diffusion.prediction = "epsilon"
    # Per-example weight of the denoising MSE: "none" (the plain mean, the paper) or "min_snr" (Hang et al.
    # 2023: min(SNR, snr_gamma)/SNR for epsilon, min(SNR, snr_gamma)/(SNR+1) for v).
    c.diffusion.loss_weighting = "none"
    c.diffusion.snr_gamma = 5.0  # The gamma of "min_snr" (the paper of min-SNR: 5).

    c.align = ml_collections.ConfigDict()
    c.align.enabled = False  # Feature alignment on (False = the baseline; configs/feature_aligned.py sets it).
    c.align.weight = 1.0  # w2: weight of the alignment loss.
    c.align.expert_workdir = placeholder(str)  # Workdir of the trained expert (required when enabled).
    # U-Net feature aligned to the expert: "down_2_shortcut" is the reference code's hook
    # (down_blocks.2.resnets.0.conv_shortcut); "down_2" is the last down block's output.
    # Any named U-Net feature: down_{i}, down_{i}_shortcut, mid (with a mid block), up_{i} (up block i's output).
    c.align.unet_feature = "down_2_shortcut"
    c.align.expert_feature = "pooled"  # Expert feature: "pooled" (2048-d for ResNet50) or a spatial stage_{s} / block_{i}.
    # "pooled": the paper, one pooled vector per image, the projector maps the expert's to the U-Net's width.
    # "tokens": REPA-style, a cosine per spatial position on one grid, the projector maps the U-Net's
    # tokens to the expert's width (needs a spatial expert_feature). See fadjax/align.py.
    c.align.mode = "pooled"
    c.align.projector = "linear"  # "linear" (the paper's W_p) or "mlp" (REPA's Linear-SiLU-Linear-SiLU-Linear).
    c.align.projector_hidden = 256  # Hidden width of the "mlp" projector (REPA: 2048).
    c.align.expert_input = "noisy"  # "noisy": expert sees x_t (the paper); "clean": x0 (Table I ablation).
    c.align.expert_resize = placeholder(int)  # Resize the expert's input to this size; None = as is (the reference).

    c.optim = common.optim(1e-4, "cosine_epoch")
    c.train = common.train(4, 20)
    c.train.log_every = 50
    c.train.checkpoint_every = 2000
    c.train.ema_decay = placeholder(float)  # EMA of the parameters (e.g. 0.999); None = no EMA.
    # EMA warm-up: the decay at step t is min(ema_decay, (1 + t) / (10 + t)), so a short run's EMA is
    # not mostly its initialisation (False: the fixed decay from step 0).
    c.train.ema_warmup = True
    # Power-function EMA (EDM2, Karras et al. 2024) of relative length sigma_rel (e.g. 0.1) when > 0: its
    # averaging window grows with the run, a share of the steps taken so far; it replaces ema_decay (and
    # its warm-up). 0 = off.
    c.train.ema_sigma_rel = 0.0

    c.sample = ml_collections.ConfigDict()
    # "ddpm" (all training steps, the paper), "ddim", "dpmpp_2m" (DPM-Solver++ 2M), "euler" or "heun" (EDM's
    # deterministic samplers on Karras sigmas; heun calls the U-Net twice a step). See fadjax/sampling.py.
    c.sample.sampler = "ddpm"
    # Sampling steps (None = all training steps for DDPM, 50 for DDIM, 25 for dpmpp_2m, euler and heun).
    c.sample.steps = placeholder(int)
    c.sample.karras_sigmas = False  # dpmpp_2m on Karras sigmas (rho 7); euler and heun always use them.
    c.sample.num_per_class = 10  # Images per class and seed (the paper: 10).
    c.sample.seeds = "0-14"  # Seeds shared by every compared model (the paper: 15).
    c.sample.exclude_classes = "empty"  # Comma-separated classes not generated (the paper drops "empty").
    c.sample.guidance_scale = 1.0  # Classifier-free guidance (needs cond.label_dropout > 0 in training).
    # Guide only at noise levels sigma = sqrt((1-abar)/abar) in (lo, hi], "lo,hi" such as "0.28,2.9"
    # (Kynkäänniemi et al. 2024), plain conditional elsewhere; None = at every step.
    c.sample.guidance_interval = placeholder(str)
    c.sample.batch_size = 70  # Images per compiled sampling call.

    if "tiny" in variants:
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
    if "demo" in variants:  # README's first command (on top of tiny); each value measured on 2 cores.
        c.data.source = "demo:200"                # 5 procedural texture classes x 200 images.
        c.num_devices = 1
        c.data.image_size = 16
        c.diffusion.data_range = "[-1,1]"         # The usual DDPM practice (the reference: [0, 1]).
        # Three levels: 16, 8 and 4 px; width 32 at 16 px is what draws stripes and checks (docs/decisions.md).
        c.model.block_out_channels = "32,48,64"
        c.model.attention_levels = "2"            # Attention at 4x4 only (at 8x8 too: slower, no better).
        c.model.class_to_time = True              # The class in every ResNet block too: checks drawn better.
        c.align.unet_feature = "down_2_shortcut"  # The last down block's first-resnet shortcut, as tiny-sd.
        c.model.attention_head_dim = 1
        c.model.cross_attention_dim = 32
        c.model.norm_num_groups = 8
        c.cond.label_dropout = 0.1                # Trains the unconditional branch for guidance.
        c.train.batch_size = 32
        c.train.num_steps = 120                   # Each model's own steps after the shared pre-training.
        c.optim.lr = 1e-3
        c.optim.schedule = "cosine"
        c.optim.warmup_steps = 20
        c.train.ema_decay = 0.995                 # With the warm-up of train.ema_warmup.
        c.train.log_every = 50
        c.train.checkpoint_every = 120
        c.sample.sampler = "ddpm"                 # DDPM beat DDIM at this training length.
        c.sample.steps = 25                       # As good as 50 and 100 here.
        c.sample.guidance_scale = 5.0             # Classifier-free guidance; measured in docs/decisions.md.
        c.sample.num_per_class = 4
        c.sample.seeds = "0-4"
        c.sample.batch_size = 100
        if "pretrain" in variants:
            c.train.num_steps = 900  # The shared pre-training: 29k images (700: 2-3 of seed 0's 4 stripes tiles are stripes; 900: all 4).
            c.optim.lr = 2e-3
            c.optim.warmup_steps = 50
            c.train.checkpoint_every = 900
    if "micro" in variants:  # The tests (on top of tiny): every stage runs in seconds and learns nothing.
        c.data.source = "demo:24"                 # 5 procedural texture classes x 24 images.
        c.num_devices = 1
        c.data.image_size = 8                     # 8x8 images.
        c.model.block_out_channels = "8,16"       # Two levels (each level costs seconds of CPU compile) ...
        c.align.unet_feature = "down_1_shortcut"  # ... so the hook is the last level's shortcut.
        c.model.attention_head_dim = 1
        c.model.cross_attention_dim = 8
        c.model.norm_num_groups = 4
        c.train.num_steps = 4
        c.train.log_every = 2
        c.train.checkpoint_every = 4
        c.train.keep_evenly = 4                   # Every step kept: the learning curves' points.
        c.sample.steps = 4                        # DDIM steps.
        c.sample.num_per_class = 3
        c.sample.seeds = "0-4"
        c.sample.batch_size = 32
    if "cpu" in variants:  # The real tiles on 2 CPU cores in 90 minutes end to end (results/paper_cpu).
        c.num_devices = 1
        c.data.image_size = 32
        c.data.transpose = True                      # All 8 symmetries of a tile.
        c.diffusion.data_range = "[-1,1]"            # The usual DDPM practice (the reference: [0, 1]).
        c.diffusion.prediction = "v_prediction"      # The recipe of docs/decisions.md (2026-12-08) ...
        c.diffusion.loss_weighting = "min_snr"       # ... with min-SNR-5 weighting.
        c.model.block_out_channels = "16,32,64,128"  # Four levels: 32, 16, 8 and 4 px.
        c.model.attention_levels = "2,3"             # Attention at 8x8 and 4x4 only.
        c.model.attention_head_dim = 4
        c.model.cross_attention_dim = 128
        c.model.norm_num_groups = 8
        c.align.unet_feature = "down_3_shortcut"     # The last down block's first-resnet shortcut, as tiny-sd.
        c.cond.label_dropout = 0.1                   # Trains the unconditional branch for guidance.
        c.train.batch_size = 32
        c.train.num_epochs = None
        c.train.num_steps = 300                      # Each model's own steps after the shared pre-training.
        c.optim.lr = 5e-4
        c.optim.schedule = "cosine"
        c.optim.warmup_steps = 20
        c.train.ema_sigma_rel = 0.1                  # Power-function EMA: its length follows the run's.
        c.train.log_every = 50
        c.train.checkpoint_every = 300
        c.train.keep_evenly = 4                      # Checkpoints at 1/4, 1/2, 3/4, end: the learning curves.
        c.sample.sampler = "dpmpp_2m"                # Chosen by FD on the validation split (docs/decisions.md).
        c.sample.steps = 15
        c.sample.guidance_scale = 3.0
        c.sample.guidance_interval = "0.28,5.4"      # Guided only at middle noise levels.
        c.sample.batch_size = 350                    # 1050 images per model in 3 compiled calls.
        if "pretrain" in variants:
            c.train.num_steps = 2000  # The shared pre-training: 64k images (~17 epochs of 3680).
            c.optim.lr = 1e-3
            c.optim.warmup_steps = 100
            c.train.checkpoint_every = 500
    if "fast" in variants:  # One GPU (budget in fadjax/reproduce/presets.py).
        c.dtype = "bfloat16"                      # Mixed precision (params and Adam in float32).
        c.model.block_out_channels = "64,128"     # Two of tiny-sd's three levels, at 1/5 of its width.
        c.model.attention_head_dim = 4            # Heads per block (tiny-sd: 8).
        c.model.cross_attention_dim = 256         # Context width (tiny-sd: 768).
        # model.attention stays 'auto': cuDNN flash attention on a GPU in bf16, XLA or chunked elsewhere.
        c.align.unet_feature = "down_1_shortcut"  # Last down block's first-resnet shortcut (tiny-sd: down_2_...).
        c.train.batch_size = 128                  # Paper 4.
        c.train.num_epochs = None                 # Run length in steps instead ...
        c.train.num_steps = 400                   # ... 400 x 128 = 51k images (~14 epochs; paper 20 x 3680).
        c.optim.lr = 5e-4                         # Paper 1e-4 at batch 4; ~sqrt-scaled to batch 128.
        c.optim.schedule = "cosine"               # Per-step cosine (paper: cosine stepped per epoch).
        c.optim.warmup_steps = 25                 # Linear warm-up for the large batch.
        c.train.log_every = 50                    # 8 log lines per model.
        c.train.checkpoint_every = 400            # One checkpoint, at the end.
        c.sample.sampler = "ddim"                 # Paper: DDPM, all 1000 steps.
        c.sample.steps = 50                       # DDIM steps.
        c.sample.batch_size = 350                 # 1050 images per model in 3 compiled calls.
    return c
