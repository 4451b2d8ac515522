"""Sections every stage's config shares (data, optimizer, training loop), with a comment per field.

Loaded by the other files of this folder (``config_lib.config_module("common", beside=__file__)``);
not a config of its own.
"""
import ml_collections
from ml_collections.config_dict import placeholder


def variants(arg):
    """``"tiny,clean"`` -> ``{"tiny", "clean"}`` (the part of ``--config file.py:ARG`` after the colon)."""
    return {a.strip() for a in (arg or "").split(",") if a.strip()}


def data(image_size):
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
    # Where the training images live: "device" (copied to every device, fastest), "host" (memory-mapped cache,
    # each step's batch read and prefetched on the host: for sets larger than a device) or "auto" (host when
    # they exceed data.device_share of one device's memory). Both give the same batches.
    d.placement = "auto"
    d.device_share = 0.25  # "auto": the share of one device's memory (host RAM on CPU) the images may take.
    d.prefetch = 4  # Host path: steps read ahead by a background thread.
    d.hflip = True  # Random horizontal flips during training.
    d.vflip = True  # Random vertical flips during training.
    # Random transposes during training: with both flips, all 8 symmetries of a square tile (histology has
    # no orientation). Off by default: the paper's reference flips only.
    d.transpose = False
    return d


def optim(lr, schedule):
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


def train(batch_size, num_epochs):
    t = ml_collections.ConfigDict()
    t.batch_size = batch_size  # Global batch size (split over all devices of all processes).
    t.num_epochs = placeholder(int) if num_epochs is None else num_epochs  # Run length in epochs ...
    t.num_steps = placeholder(int)  # ... or in optimizer steps (set exactly one of the two).
    t.log_every = 50  # Steps between metric logs (metrics.jsonl, TensorBoard, non-finite check).
    t.checkpoint_every = 1000  # Steps between checkpoints (and one at the end).
    t.keep_checkpoints = 3  # Number of most recent checkpoints kept.
    # Also save and keep this many evenly spaced checkpoints (every ceil(total / N) steps, the last at the
    # end), whatever keep_checkpoints says; e.g. 4: at 1/4, 1/2, 3/4 and the end of the run (the learning
    # curves of fadjax.reproduce). None = none.
    t.keep_evenly = placeholder(int)
    t.progress = True  # Progress bar with ETA on a terminal (process 0).
    # Resume a workdir even though this config changes what it trained (model, data, optimizer, seed,
    # ...); the changes are recorded in run.json. False: such a rerun stops naming each changed field.
    t.allow_config_change = False
    return t

