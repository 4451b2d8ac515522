"""``python -m fadjax.export``: a micro run exported to diffusers' format predicts the same noise in PyTorch (with
and without the class-to-time projection), the model card's snippet samples what fadjax's sampler samples, and
what cannot be exported, or would overwrite a folder, is refused in one line."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # PyTorch parity (the test extra).
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import load_file  # noqa: E402

from fadjax import config_lib, sampling  # noqa: E402
from fadjax import export as export_lib  # noqa: E402
from fadjax import train as train_lib  # noqa: E402
from fadjax.runs import load_diffusion_run  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def micro_config(class_to_time: bool):
    """The micro preset with a null row (guidance) and an EMA; the class-to-time run also predicts v in [-1, 1]
    and samples like the cpu preset (DPM-Solver++ on Karras sigmas, guidance in an interval)."""
    c = config_lib.load("baseline", "tiny,micro")
    c.train.progress = False
    c.cond.label_dropout = 0.2
    c.train.ema_decay = 0.9
    c.sample.guidance_scale = 2.0
    if class_to_time:
        c.model.class_to_time = True
        c.diffusion.prediction = "v_prediction"
        c.diffusion.data_range = "[-1,1]"
        c.sample.sampler = "dpmpp_2m"
        c.sample.karras_sigmas = True
        c.sample.guidance_scale = 3.0
        c.sample.guidance_interval = "0.28,5.4"
    return c


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "class_to_time"])
def trained(request, tmp_path_factory):
    """A finished micro run (checkpoints at steps 1-4) and its default export."""
    root = tmp_path_factory.mktemp("export_class_to_time" if request.param else "export_plain")
    workdir = root / "run"
    train_lib.run(micro_config(request.param), workdir)
    export_lib.main(["--workdir", str(workdir), "--out", str(root / "out")])
    return workdir, root / "out", request.param


def only_plain(trained):
    """The tests of the command itself run on one of the two runs."""
    if trained[2]:
        pytest.skip("run on the plain run")
    return trained[:2]


def unet_call(unet, x, t, ctx):
    """diffusers' U-Net on NHWC numpy ``x``; the class vector is also ``class_labels`` with class-to-time."""
    labels = ctx[:, 0] if unet.config.class_embed_type == "projection" else None
    with torch.no_grad():
        out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), ctx, class_labels=labels).sample
    return out.permute(0, 2, 3, 1).numpy()


def test_diffusers_loads_the_export_and_predicts_the_same_noise(trained):
    from diffusers import UNet2DConditionModel
    workdir, out, _ = trained
    run = load_diffusion_run(workdir)  # EMA weights, as the export's default.
    assert run.used_ema
    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    # Every tensor diffusers' model has, at its shape, and nothing else.
    state = load_file(str(out / "unet" / export_lib.WEIGHTS))
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == expected
    assert (unet.config.class_embed_type == "projection") == bool(run.config.model.class_to_time)

    cond = json.loads((out / export_lib.CONDITIONING).read_text())
    assert cond["class_names"] == run.class_names and cond["null_row"] == run.null_label == len(run.class_names)
    assert np.asarray(cond["context"]).shape == (run.labels.size, run.model.unet.config.cross_attention_dim)
    np.testing.assert_array_equal(np.asarray(cond["context"], np.float32),
                                  np.asarray(run.params["cond"]["embedding"]["embedding"]))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, run.channels)).astype(np.float32)
    t = np.array([3, 500, 777], np.int32)
    labels = np.array([1, run.null_label, 4], np.int32)
    ours = np.asarray(run.eps_fn(run.params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(labels)))
    ctx = torch.tensor(cond["context"])[labels.tolist()][:, None]  # [3, 1, D]
    theirs = unet_call(unet, x, t, ctx)
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    # The class matters (a wrong or ignored context could not pass the comparison above by luck).
    other = unet_call(unet, x, t, torch.tensor(cond["context"])[[0, 0, 0]][:, None])
    assert np.abs(other - theirs).max() > 1e-5

    if run.config.model.class_to_time:  # The readable offsets are the U-Net's class_embedding of each row.
        with torch.no_grad():
            offsets = unet.class_embedding(torch.tensor(cond["context"])).numpy()
        np.testing.assert_allclose(cond["class_to_time"]["offsets"], offsets, atol=1e-5)
    else:
        assert cond["class_to_time"] is None

    scheduler_json = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_json["_class_name"]).from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.prediction_type == run.prediction
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), np.asarray(run.schedule.alphas_cumprod), rtol=1e-5)


@pytest.mark.parametrize("variant, sampler", [(False, "ddim"), (True, "dpmpp_2m"), (True, "euler")])
def test_the_cards_snippet_samples_what_fadjax_samples(trained, tmp_path, monkeypatch, variant, sampler):
    workdir, _, class_to_time = trained
    if class_to_time != variant:
        pytest.skip("a case of the other run")
    run = load_diffusion_run(workdir)
    out = tmp_path / "out"
    settings = export_lib.export(workdir, out, sampler=sampler, steps=4)["settings"]
    code = export_lib.extract_snippet((out / export_lib.CARD).read_text())
    assert len(code.splitlines()) <= 22, code

    label = run.condition_labels[run.class_names[0]]  # The snippet's class.
    keys = sampling.image_keys(0, [0])
    noise = np.asarray(sampling.initial_noise(keys, (run.image_size, run.image_size, run.channels)))
    ours = sampling.sample(run.eps_fn, run.params, run.schedule, [label], keys=keys,
                           shape=(run.image_size, run.image_size, run.channels), sampler=sampler, steps=4,
                           guidance_scale=settings["guidance_scale"], null_label=run.null_label,
                           prediction=run.prediction, karras_sigmas=settings["karras_sigmas"],
                           guidance_interval=settings["guidance_interval"])
    assert settings["guidance_scale"] > 1.0  # The snippet guides.

    draws, original = [], torch.randn
    want = (1, run.channels, run.image_size, run.image_size)

    def randn(*shape, **kw):  # The snippet's starting noise is fadjax's.
        draws.append(shape)
        return torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()) if shape == want else original(*shape, **kw)

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.chdir(out)
    namespace = {}
    exec(compile(code, "README.md snippet", "exec"), namespace)  # pylint: disable=exec-used
    assert draws == [want]
    x = namespace["x"].permute(0, 2, 3, 1).numpy()
    scale = max(1.0, float(np.abs(x).max()))
    np.testing.assert_allclose(np.asarray(ours), x, rtol=1e-4, atol=1e-4 * scale)
    image = namespace["image"].permute(0, 2, 3, 1).numpy()
    from fadjax.diffusion import from_model_range
    np.testing.assert_allclose(np.clip(np.asarray(from_model_range(ours, run.data_range)), 0, 1), image, atol=1e-4)


def test_step_and_raw_weights(trained, tmp_path):
    workdir, _ = only_plain(trained)
    export_lib.main(["--workdir", str(workdir), "--out", str(tmp_path / "raw2"), "--step", "2", "--no_ema"])
    state = load_file(str(tmp_path / "raw2" / "unet" / export_lib.WEIGHTS))
    raw = load_diffusion_run(workdir, step=2, use_ema=False)
    assert not raw.used_ema
    want = export_lib.unet_state_dict(raw.params["unet"])
    assert state.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    np.testing.assert_array_equal(state["conv_in.weight"],
                                  np.asarray(raw.params["unet"]["conv_in"]["kernel"]).transpose(3, 2, 0, 1))
    ema = load_diffusion_run(workdir, step=2)
    assert np.abs(export_lib.unet_state_dict(ema.params["unet"])["conv_in.weight"] - state["conv_in.weight"]).max() > 0
    assert "step 2, raw (not EMA) weights" in (tmp_path / "raw2" / export_lib.CARD).read_text()


def test_torch_names():
    assert export_lib.torch_name(("down_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0",
                                  "kernel")) == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
    assert export_lib.torch_name(("class_embedding", "linear_2", "bias")) == "class_embedding.linear_2.bias"
    assert export_lib.torch_name(("up_blocks_0", "resnets_2", "norm1", "scale")) == "up_blocks.0.resnets.2.norm1.weight"
    with pytest.raises(export_lib.ExportError, match="mean"):
        export_lib.torch_name(("norm", "mean"))


def test_card_reports_the_reproduce_summary(trained, tmp_path):
    workdir, _ = only_plain(trained)
    out = tmp_path / "reproduce"
    shutil.copytree(workdir, out / "runs" / "fad_xt", ignore=shutil.ignore_patterns(".lock"))
    summary = {"preset": "micro", "data": "demo:24", "seeds": [0, 1],
               "judges": {"expert": {"arch": "resnet18"}, "judge2": {"arch": "resnet34"}},
               "models": {"fad_xt": {"accuracy": {"expert": {"mean": 0.875, "std": 0.01},
                                                  "judge2": {"mean": 0.8125, "std": 0.02}},
                                     "utility": {"tstr_accuracy": {"mean": 0.5}, "fd_judge2": {"value": 12.5},
                                                 "precision": {"value": 0.75}, "recall": {"value": 0.25}},
                                     "ssim_generated": 0.2, "ssim_real": 0.3}}}
    (out / "summary.json").write_text(json.dumps(summary))
    export_lib.main(["--workdir", str(out / "runs" / "fad_xt"), "--out", str(tmp_path / "e")])
    card = (tmp_path / "e" / export_lib.CARD).read_text()
    for text in ("judged by expert (resnet18) | 87.5%", "judged by judge2 (resnet34) | 81.2%",
                 "TSTR accuracy (trained on generated, tested on real) | 50.0%", "| precision | 0.750 |",
                 "| recall | 0.250 |", "Fréchet distance in judge2's features | 12.500 |", "source: `demo:24`"):
        assert text in card, text
    with pytest.raises(export_lib.ExportError, match="no model 'run'"):  # --report naming another run's summary.
        export_lib.main(["--workdir", str(workdir), "--out", str(tmp_path / "f"), "--report", str(out)])


def export_py(*args):
    return subprocess.run([sys.executable, "-m", "fadjax.export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_refusals_are_one_line(trained, tmp_path):
    workdir, out = only_plain(trained)
    before = (out / "unet" / export_lib.WEIGHTS).stat().st_mtime_ns
    for args, needle in (
            (["--workdir", str(workdir), "--out", str(out)], f"--out {out} is not empty; pass --overwrite"),
            (["--workdir", str(tmp_path), "--out", str(tmp_path / "e")], "a fadjax run's workdir?")):
        r = export_py(*args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith("python -m fadjax.export: error: ") and needle in lines[0], lines[0]
    assert (out / "unet" / export_lib.WEIGHTS).stat().st_mtime_ns == before  # Nothing was overwritten.
    assert not (tmp_path / "e").exists()
    export_lib.main(["--workdir", str(workdir), "--out", str(out), "--overwrite"])
    assert (out / "unet" / export_lib.WEIGHTS).stat().st_mtime_ns != before


@pytest.mark.parametrize("head_hidden", [8, None], ids=["paper_head", "linear_head"])
def test_an_expert_exports_to_transformers(tmp_path, head_hidden):
    """A micro ResNet18 expert: transformers' ResNet gives its pooled features and logits; the paper's
    Linear-ReLU-Linear head travels beside the backbone."""
    transformers = pytest.importorskip("transformers")
    from fadjax.runs import load_expert_run
    c = config_lib.load("expert", "tiny,micro")
    c.train.progress = False
    c.train.num_epochs = 1
    c.train.eval_every_epoch = 1
    c.expert.head_hidden = head_hidden
    train_lib.run(c, tmp_path / "expert")
    with pytest.raises(export_lib.ExportError, match="--step, --no_ema"):
        export_lib.main(["--workdir", str(tmp_path / "expert"), "--out", str(tmp_path / "x"), "--no_ema"])
    out = tmp_path / "out"
    export_lib.main(["--workdir", str(tmp_path / "expert"), "--out", str(out)])
    run = load_expert_run(tmp_path / "expert")
    x = np.random.default_rng(0).random((2, run.image_size, run.image_size, run.channels), np.float32)
    logits, features = run.module.apply(run.variables, jnp.asarray(x), train=False)
    code = export_lib.extract_snippet((out / export_lib.CARD).read_text())
    namespace = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        mp.setattr(torch, "rand", lambda *shape, **kw: torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        exec(compile(code, "expert README.md snippet", "exec"), namespace)  # pylint: disable=exec-used
    model = namespace["model"]
    assert type(model).__name__ == ("ResNetModel" if head_hidden else "ResNetForImageClassification")
    assert model.config.id2label == dict(enumerate(run.class_names))
    np.testing.assert_allclose(namespace["logits"].numpy(), np.asarray(logits), atol=1e-4, rtol=1e-4)
    if head_hidden:
        np.testing.assert_allclose(namespace["pooled"].numpy(), np.asarray(features["pooled"]), atol=1e-4, rtol=1e-4)
    state = {k.removeprefix("resnet."): v for k, v in load_file(str(out / "model.safetensors")).items()}
    base = transformers.ResNetModel(transformers.ResNetConfig.from_pretrained(out)).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items() if not k.startswith("classifier.")} == {
        k: tuple(v.shape) for k, v in base.items()}
