"""DreamBooth fine-tuning (configs/dreambooth.py, fadjax/train/dreambooth.py) on a few generated Kather-like tiles:
from a micro baseline run, with and without alignment, prior-image cache, resume after a crash,
samples with the identifier and their evaluation; plus the label rows, the cache and config errors."""
import importlib.util
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tile_folder

from fadjax import config_lib, evaluate, runs, sample
from fadjax import workdir as workdir_lib
from fadjax import train as train_lib
from fadjax.models import build
from fadjax.train import dreambooth

PER_CLASS = 10
CLASSES = ("tumor", "stroma", "complex", "lympho", "debris", "mucosa", "adipose", "empty")


def dreambooth_config(arg=None):
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "dreambooth.py"
    spec = importlib.util.spec_from_file_location("dreambooth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """A folder source of PER_CLASS generated 150x150 grayscale tiles per Kather class (conftest)."""
    return make_tile_folder(tmp_path_factory.mktemp("db_tiles"), per_class=PER_CLASS)


@pytest.fixture(scope="module")
def expert_workdir(tiles, tmp_path_factory):
    c = config_lib.load("expert", "tiny")
    c.data.source = tiles
    c.num_devices = 1
    c.train.progress = False
    c.train.num_epochs = 1
    workdir = tmp_path_factory.mktemp("db_expert")
    train_lib.run(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def baseline(tiles, tmp_path_factory):
    """A micro baseline (8x8 images, U-Net 8,16) with a null label and an EMA."""
    c = config_lib.load("baseline", "tiny")
    c.data.source = tiles
    c.num_devices = 1
    c.train.progress = False
    c.data.image_size = 8
    c.model.block_out_channels = "8,16"
    c.model.attention_head_dim = 1
    c.model.cross_attention_dim = 8
    c.model.norm_num_groups = 4
    c.train.num_steps = 2
    c.train.checkpoint_every = 2
    c.cond.label_dropout = 0.2
    c.train.ema_decay = 0.9
    workdir = tmp_path_factory.mktemp("db_baseline")
    train_lib.run(c, workdir)
    return workdir


def db_config(baseline, *, align=False, expert_workdir=None):
    c = dreambooth_config("tiny,align" if align else "tiny")
    c.init_from = str(baseline)
    c.num_devices = 1
    c.train.progress = False
    if align:
        c.align.expert_workdir = str(expert_workdir)
        c.align.unet_feature = "down_1_shortcut"  # The micro U-Net has two blocks.
    return c


def read_metrics(workdir):
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("align", [False, True], ids=["plain", "aligned"])
def test_dreambooth_caches_prior_resumes_and_evaluates(baseline, expert_workdir, tmp_path, monkeypatch, align,
                                                     killed_after_first_checkpoint):
    c = db_config(baseline, align=align, expert_workdir=expert_workdir)
    calls = []
    generate = dreambooth.generate_prior_images
    monkeypatch.setattr(dreambooth, "generate_prior_images", lambda *a, **kw: calls.append(kw) or generate(*a, **kw))

    with killed_after_first_checkpoint():
        train_lib.run(c, tmp_path / "crash")
    assert len(calls) == 1 and calls[0]["num_images"] == 8 and calls[0]["sampler"] == "ddim"
    with np.load(tmp_path / "crash" / dreambooth.PRIOR_FILE) as f:
        prior = f["images"]
        settings = json.loads(str(f["settings"]))
    assert prior.shape == (8, 8, 8, 1) and prior.dtype == np.uint8
    assert settings["class_label"] == 0 and settings["start"]["step"] == 2 and settings["steps"] == 4

    summary = train_lib.run(c, tmp_path / "crash")  # the same command again resumes
    assert len(calls) == 1, "the cached prior images were generated again"
    assert summary["prior_images"]["generated"] is False and summary["prior_images"]["num_images"] == 8
    assert summary["start_step"] == 3 and summary["final_step"] == 6
    rows = read_metrics(tmp_path / "crash")
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    for r in rows:
        assert np.isfinite(r["loss"])
        if align:
            assert 0.0 <= r["align_loss"] <= 2.0
            assert r["loss"] == pytest.approx(r["noise_loss"] + r["align_loss"], rel=1e-5)
        else:
            assert "align_loss" not in r and r["loss"] == pytest.approx(r["noise_loss"], rel=1e-6)

    if not align:  # An uninterrupted run: same prior images, same parameters.
        full = train_lib.run(c, tmp_path / "full")
        assert full["prior_images"]["generated"] is True and len(calls) == 2
        with np.load(tmp_path / "full" / dreambooth.PRIOR_FILE) as f:
            np.testing.assert_array_equal(f["images"], prior)
        a = runs.load_diffusion_run(tmp_path / "full", use_ema=False).params
        b = runs.load_diffusion_run(tmp_path / "crash", use_ema=False).params
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)

    record = json.loads((tmp_path / "crash" / "run.json").read_text())
    assert record["condition_overrides"] == {"tumor": 8}
    assert record["labels"] == {"class_names": list(CLASSES), "extra": ["sks tumor"], "has_null": True}
    db = record["dreambooth"]
    assert db["identifier_text"] == "sks tumor" and db["num_instance_images"] == 8  # 80% of 10 tumor tiles
    assert db["prior_images"]["num_images"] == 8 and db["prior_weight"] == 1.0
    assert db["inherited"]["data.image_size"] == 8 and db["inherited"]["model.block_out_channels"] == "8,16"
    assert ("expert" in record) == align
    run = runs.load_diffusion_run(tmp_path / "crash")
    assert run.condition_labels["tumor"] == 8 and run.condition_labels["stroma"] == 1
    assert run.params["cond"]["embedding"]["embedding"].shape == (10, 8)
    assert sample.default_classes(run) == ["tumor"]
    assert ("proj" in run.params) == align

    gens = tmp_path / "gens"
    manifest = sample.generate(run, str(gens), seeds=[0, 1], num_per_class=2, progress=False)
    assert manifest["classes"] == ["tumor"] and {e["label"] for e in manifest["images"]} == {8}
    result = evaluate.evaluate(str(gens), runs.load_expert_run(expert_workdir), str(tmp_path / "report"))
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["accuracy"]["num_images"] == 4 and list(saved["accuracy"]["per_class"]) == ["tumor"]
    assert saved["accuracy"]["mean"] == pytest.approx(result["accuracy"]["per_class"]["tumor"])
    assert 0.0 <= saved["accuracy"]["mean"] <= 1.0


@pytest.fixture(scope="module")
def pretrained_unet(tmp_path_factory):
    """A random micro PyTorch diffusers U-Net (4 channels, as Stable Diffusion's) saved as safetensors."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        mid_block_type=None, layers_per_block=1, attention_head_dim=1, cross_attention_dim=8, norm_num_groups=4)
    folder = tmp_path_factory.mktemp("db_pretrained")
    model.save_pretrained(folder)
    return folder


def test_dreambooth_from_pretrained_unet(tiles, pretrained_unet, tmp_path):
    c = dreambooth_config("tiny")
    c.model.pretrained = str(pretrained_unet)
    c.data.source = tiles
    c.data.image_size = 8
    c.num_devices = 1
    c.train.progress = False
    c.train.num_steps = c.train.checkpoint_every = 1
    c.optim.lr = 1e-10  # The checkpoint is (to 1e-10) the initial parameters.
    c.dreambooth.num_class_images = 4
    summary = train_lib.run(c, tmp_path)
    assert summary["final_step"] == 1 and summary["prior_images"]["generated"]
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["dreambooth"]["start"] == {"pretrained": str(pretrained_unet)}
    assert record["labels"]["extra"] == ["sks tumor"] and record["condition_overrides"] == {"tumor": 8}
    # The prior images came from the very model fine-tuning started from (same conditioner init).
    cfg = workdir_lib.read_config(tmp_path)
    _, start, _ = dreambooth._starting_model(cfg, tmp_path, build.LabelSpace.from_dict(record["labels"]))
    trained = runs.load_diffusion_run(tmp_path, use_ema=False).params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), start, trained)


def test_identifier_row_starts_from_the_class_row_and_null_row_is_kept():
    src = build.LabelSpace(("a", "b", "c"), (), has_null=True)  # rows a b c null
    new = build.LabelSpace(("a", "b", "c"), ("sks b",), has_null=True)  # rows a b c "sks b" null
    assert dreambooth.row_sources(new, src, class_name="b", identifier="sks b") == [0, 1, 2, 1, 3]
    # From a DreamBooth run: its identifier keeps its row; a second one starts from its class.
    src2 = build.LabelSpace(("a", "b"), ("sks a",), has_null=False)
    new2 = build.LabelSpace(("a", "b"), ("sks a", "sks b"), has_null=True)
    assert dreambooth.row_sources(new2, src2, class_name="b", identifier="sks b") == [0, 1, 2, 1, None]

    cfg = types.SimpleNamespace(to_dict=lambda: {})
    src_table = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)
    fresh = jnp.full((5, 2), -1.0)
    source_run = types.SimpleNamespace(model=types.SimpleNamespace(unet=types.SimpleNamespace(config=cfg)),
                                       labels=src, params={"cond": {"embedding": {"embedding": src_table}}})
    model = types.SimpleNamespace(unet=types.SimpleNamespace(config=cfg), labels=new)
    out = dreambooth.init_params(model, {"unet": {}, "cond": {"embedding": {"embedding": fresh}}}, source_run,
                                 class_name="b", identifier="sks b")
    np.testing.assert_array_equal(out["cond"]["embedding"]["embedding"], src_table[[0, 1, 2, 1, 3]])


def test_prior_cache_is_validated(tmp_path):
    settings = {"format": 1, "class_label": 0, "sampler": "ddim", "steps": 4, "seed": 0, "num_images": 3,
                "image_size": 4, "channels": 1, "start": {"init_from": "/x", "step": 2, "use_ema": True}}
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    path = tmp_path / dreambooth.PRIOR_FILE
    assert dreambooth.read_prior_cache(path, settings) is None
    dreambooth.write_prior_cache(path, images, settings)
    np.testing.assert_array_equal(dreambooth.read_prior_cache(path, settings), images)
    assert dreambooth.read_prior_cache(path, {**settings, "steps": 50}) is None  # other sampler settings
    assert dreambooth.read_prior_cache(path, {**settings, "start": {**settings["start"], "step": 4}}) is None
    dreambooth.write_prior_cache(path, images[:2], settings)  # fewer images than it says
    assert dreambooth.read_prior_cache(path, settings) is None
    path.write_bytes(b"not an npz")
    assert dreambooth.read_prior_cache(path, settings) is None


def test_config_variants():
    c = dreambooth_config()
    assert c.dreambooth.enabled and not c.align.enabled and c.data.classes == "tumor"
    assert c.optim.lr == 5e-6 and c.dreambooth.prior_weight == 1.0 and 100 <= c.dreambooth.num_class_images <= 200
    assert c.data.source is None and c.dreambooth.identifier == "sks"
    both = dreambooth_config("tiny,align")
    assert both.align.enabled and both.train.num_steps == 6 and both.dreambooth.num_class_images == 8
    assert dreambooth_config("align").train.num_steps == 1000


@pytest.mark.parametrize("field,value,match", [
    ("data.classes", "tumor,stroma", "data.classes"),
    ("data.classes", "nosuch", "data.classes"),
    ("init_from", None, "init_from"),
    ("dreambooth.prior_batch_size", 9, "num_class_images"),
    ("dreambooth.prior_steps", 5000, "dreambooth.prior_steps"),
    ("dreambooth.prior_batch_size", 3, "prior_batch_size"),  # 4 + 3 over 2 devices
])
def test_bad_values_are_rejected_before_training(baseline, tmp_path, field, value, match):
    c = db_config(baseline)
    c.num_devices = 2
    section, key = field.split(".") if "." in field else (None, field)
    if section:
        c[section][key] = value
    else:
        c[key] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        train_lib.run(c, tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / dreambooth.PRIOR_FILE).exists()


def test_fine_tuning_keeps_the_class_path_of_the_run_it_starts_from(baseline, tmp_path):
    """init_from a run without model.class_to_time, with it on: refused naming the field (its class path
    would otherwise start from random weights), before any step."""
    c = db_config(baseline)
    c.model.class_to_time = True
    with pytest.raises(config_lib.ConfigError, match="config.model.class_to_time: True here, but the init_from run"):
        train_lib.run(c, tmp_path / "db")
    assert not (tmp_path / "db" / "checkpoints").exists() or not any((tmp_path / "db" / "checkpoints").iterdir())
