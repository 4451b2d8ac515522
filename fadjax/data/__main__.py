"""Scans a data source, reports what it found, and optionally writes the training cache.

    python -m fadjax.data --source folder:/path/to/Kather_texture_2016_image_tiles_5000
    python -m fadjax.data --source tfds:colorectal_histology [--manual_dir DIR] [--data_dir DIR]
    python -m fadjax.data --source demo            # or demo:N, N images per class
    python -m fadjax.data --source folder:/path --cache out/kather64.npz --image_size 64 --channels 1
    python -m fadjax.data --source folder:/path --classes tumor,stroma --skip_bad_files

Prints the classes (index, folder, name), images per class, the sizes and modes seen and every
problem. Exits 1 with the error (e.g. every undecodable file by path) when the source cannot be
used as asked.
"""
import sys

from absl import app
from absl import flags

from fadjax.data import loader
from fadjax.data.dataset import DataError

_SOURCE = flags.DEFINE_string("source", None, "folder:PATH, tfds:NAME[:SPLIT], demo or demo:N.",
                              required=True)
_CACHE = flags.DEFINE_string("cache", None, "Write (or check and reuse) this .npz cache.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Side of the square output images.")
_CHANNELS = flags.DEFINE_enum("channels", "1", ["1", "3"], "1 (luma, as the paper) or 3 (RGB).")
_CLASSES = flags.DEFINE_list("classes", None, "Class names to keep, in label order.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_files", False, "Skip undecodable image files.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "TFDS manual download directory.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar while decoding.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        dataset = loader.load(
            _SOURCE.value, image_size=_IMAGE_SIZE.value, channels=int(_CHANNELS.value),
            classes=_CLASSES.value, skip_bad_files=_SKIP_BAD.value, cache=_CACHE.value,
            data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value, progress=_PROGRESS.value,
            on_scan=lambda report: print(report.format(), flush=True))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"dataset: {len(dataset)} images {list(dataset.images.shape[1:])} uint8, "
          f"{dataset.num_classes} classes")
    for label, (name, count) in enumerate(zip(dataset.class_names, dataset.class_counts())):
        print(f"  {label:3d}  {name:<16s} {count:6d}")
    if _CACHE.value:
        print(f"cache: {_CACHE.value}")


if __name__ == "__main__":
    app.run(main)
