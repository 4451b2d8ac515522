"""configs/: every file and variant loads and validates; the paper's values are the defaults; the
package holds no defaults of its own."""
import pytest

from fadjax import config_lib
from fadjax.reproduce import presets

VARIANTS = {
    "expert": [None, "tiny", "cpu", "fast", "tiny,demo", "tiny,micro", "judge2", "cpu,judge2", "tiny,demo,judge2"],
    "baseline": [None, "tiny", "cpu", "fast", "tiny,demo", "tiny,micro", "cpu,pretrain", "tiny,demo,pretrain"],
    "feature_aligned": [None, "tiny", "clean", "tokens", "cpu,clean,tokens", "fast,tokens"],
    "dreambooth": [None, "tiny", "align", "tiny,align"],
}


@pytest.mark.parametrize("name, arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_every_config_file_and_variant_validates(name, arg):
    c = config_lib.load(name, arg)
    if c.data.source is None:
        c.data.source = "folder:/tiles"
    if c.stage == "diffusion" and c.align.enabled:
        c.align.expert_workdir = "runs/expert"
    if name == "dreambooth":
        c.init_from = "runs/baseline"
    config_lib.validate(c)


def test_defaults_are_the_papers_and_variants_change_only_their_fields():
    e, d = config_lib.load("expert"), config_lib.load("feature_aligned")
    assert (e.expert.arch, e.data.image_size, e.train.batch_size, e.train.num_epochs, e.optim.lr,
            e.optim.schedule, e.optim.step_gamma) == ("resnet50", 224, 64, 15, 1e-4, "step_epoch", 0.7)
    assert (d.data.image_size, d.train.batch_size, d.train.num_epochs, d.optim.lr, d.diffusion.num_train_timesteps,
            d.diffusion.beta_schedule, d.diffusion.loss_weight, d.align.weight, d.align.unet_feature) == (
        64, 4, 20, 1e-4, 1000, "squaredcos_cap_v2", 1.0, 1.0, "down_2_shortcut")
    assert d.align.enabled and not config_lib.load("baseline").align.enabled
    clean = config_lib.load("feature_aligned", "clean")
    assert clean.align.expert_input == "clean" and clean.to_dict() != d.to_dict()
    clean.align.expert_input = "noisy"
    assert clean.to_dict() == d.to_dict()  # The variant changed that one field.
    tokens = config_lib.load("feature_aligned", "cpu,tokens")
    assert (tokens.align.mode, tokens.align.projector, tokens.align.expert_feature, tokens.align.weight) == (
        "tokens", "mlp", "stage_2", 0.5)
    pre, base = config_lib.load("baseline", "cpu,pretrain"), config_lib.load("baseline", "cpu")
    assert pre.train.num_steps > base.train.num_steps and pre.model == base.model
    # The paper's objective and sampler stay the defaults (the `paper` preset); `cpu` takes the new recipe.
    assert (d.diffusion.prediction, d.diffusion.loss_weighting, d.data.transpose, d.train.ema_sigma_rel,
            d.sample.sampler, d.sample.guidance_interval) == ("epsilon", "none", False, 0.0, "ddpm", None)
    assert (base.diffusion.prediction, base.diffusion.loss_weighting, base.data.transpose) == (
        "v_prediction", "min_snr", True)


def test_the_package_builds_configs_only_from_the_files():
    assert not hasattr(config_lib, "expert_config") and not hasattr(config_lib, "diffusion_config")
    with pytest.raises(config_lib.ConfigError, match="nope.py not found"):
        config_lib.load("nope")
    # reproduce's presets are the files' variants: the cpu preset's baseline is baseline.py:cpu plus the
    # folders reproduce fills in.
    c = presets.build("cpu", data="folder:/tiles", seeds=None, expert_workdir="e", cache_dir=None,
                      pretrain_workdir="p")
    expected = config_lib.load("baseline", "cpu")
    expected.data.source, expected.init_from = "folder:/tiles", "p"
    assert c.models["baseline"].to_dict() == expected.to_dict()


def test_class_to_time_needs_a_unet_of_our_own():
    c = config_lib.load("baseline", "tiny,demo")
    assert c.model.class_to_time
    c.model.pretrained = "segmind/tiny-sd"
    with pytest.raises(config_lib.ConfigError, match="model.class_to_time"):
        config_lib.validate(c)
