"""Test setup shared by the whole suite.

Eight virtual CPU devices (multi-device tests need them; single-device tests use the first one)
and JAX's persistent compilation cache, so that recompiling the same function in another test
or another run is cheap. Both must be set before JAX is imported.
"""
import contextlib
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("FADJAX_TEST_XLA_CACHE", pathlib.Path.home() / ".cache" / "fadjax-test-xla"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


KATHER_FOLDERS = ("01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE",
                  "08_EMPTY")


def make_tile_folder(root: pathlib.Path, *, per_class: int, channels: int = 1) -> str:
    """A folder source laid out as the Kather 2016 tiles (8 class folders of 150x150 grayscale PNGs,
    or RGB ones with ``channels=3``).

    The images are generated (the demo's textures, a different draw per class), so the tests that
    train on a folder run on a fresh clone with nothing beside it.
    """
    from PIL import Image

    from fadjax.data import demo
    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(KATHER_FOLDERS):
        (root / name).mkdir()
        for i in range(per_class):
            pixels = demo.image(c % len(demo.CLASS_NAMES), 1000 * c + i, image_size=150, channels=channels)
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(root / name / f"tile_{i:03d}.png")
    return f"folder:{root}"


@pytest.fixture(scope="session")
def kather_dir(tmp_path_factory):
    """The Kather 2016 grayscale tiles (``../shared/data/kather2016_gray``, with the RGB sample beside it)
    when they are beside the repository; else generated tiles in the same layout (``make_tile_folder``:
    10 gray per class, and a 2-per-class RGB sample beside them), so no test skips for missing data."""
    path = SHARED_DATA / "kather2016_gray"
    if path.is_dir():
        return path
    root = tmp_path_factory.mktemp("kather_like")
    make_tile_folder(root / "kather2016_gray", per_class=10)
    make_tile_folder(root / "kather2016_rgb_sample", per_class=2, channels=3)
    return root / "kather2016_gray"


@pytest.fixture
def killed_after_first_checkpoint(monkeypatch):
    """A context manager: the run inside it is killed right after its first checkpoint is written.

    Usage: ``with killed_after_first_checkpoint(): train_lib.run(config, workdir)``; the block
    must end in that kill (a ``KeyboardInterrupt``), and saving works normally afterwards.
    """
    from fadjax import checkpoints

    @contextlib.contextmanager
    def kill():
        original = checkpoints.Checkpointer.save

        def save_then_crash(self, step, *a, **kw):
            original(self, step, *a, **kw)
            self.wait()
            raise KeyboardInterrupt(f"simulated kill after the checkpoint of step {step}")

        monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_crash)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(checkpoints.Checkpointer, "save", original)

    return kill
