"""Learning curves (``fadjax.curves``): which checkpoints a run keeps for them, and their x axis (images seen,
continuing from the run a model was fine-tuned from). The curves end to end: ``test_reproduce.py`` (micro)."""
import numpy as np
import pytest

from fadjax import checkpoints, curves
from fadjax import workdir as workdir_lib
from fadjax.train import loop


def test_even_steps_fall_at_the_quarters_of_a_run():
    assert checkpoints.even_steps(700, 4) == [175, 350, 525, 700]  # The cpu preset's models ...
    assert checkpoints.even_steps(3500, 4) == [875, 1750, 2625, 3500]  # ... and its pre-training.
    assert checkpoints.even_steps(4, 4) == [1, 2, 3, 4]  # micro
    assert checkpoints.even_steps(10, 4) == [3, 6, 9, 10]  # Not a multiple: ceil(10 / 4) = 3, then the end.
    assert checkpoints.even_period(10, None) is None
    with pytest.raises(ValueError):
        checkpoints.even_period(10, 0)


@pytest.mark.parametrize("keep_evenly, kept", [(4, [3, 6, 9, 10]), (None, [8, 10])])
def test_evenly_kept_checkpoints_survive_keep_checkpoints(tmp_path, keep_evenly, kept):
    """The loop saves every checkpoint_every steps, at the end and at the even steps; the Checkpointer deletes
    all but the latest keep_checkpoints, except the even steps."""
    total, every = 10, 4
    period = checkpoints.even_period(total, keep_evenly)
    saved = [s for s in range(1, total + 1) if loop.saves_checkpoint(s, total=total, every=every, keep_period=period)]
    assert saved == ([3, 4, 6, 8, 9, 10] if keep_evenly else [4, 8, 10])
    ckpt = checkpoints.Checkpointer(tmp_path / "c", keep=2, keep_period=period)
    for s in saved:
        ckpt.save(s, {"w": np.full((2,), s, np.float32)}, {"step": s})
    ckpt.close()
    assert checkpoints.saved_steps(tmp_path / "c") == kept
    tree, meta = checkpoints.Checkpointer(tmp_path / "c", keep=1, read_only=True).restore(kept[0])
    assert meta["step"] == kept[0] and float(tree["w"][0]) == kept[0]


def _fake_run(path, *, batch_size, steps, init_from=None, keep_evenly=4, total=None):
    """A workdir with what the x axis reads: config.json, run.json and (empty) checkpoint step folders."""
    workdir_lib.write_json(path / "config.json", {"init_from": init_from, "train": {
        "batch_size": batch_size, "keep_evenly": keep_evenly}})
    workdir_lib.write_json(path / "run.json", {"total_steps": total or steps[-1]})
    for s in steps:
        (path / "checkpoints" / str(s)).mkdir(parents=True)
    return path


def test_images_seen_continue_from_the_pretraining(tmp_path):
    pre = _fake_run(tmp_path / "pretrain", batch_size=32, steps=[875, 1750, 2625, 3500])
    model = _fake_run(tmp_path / "baseline", batch_size=16, steps=[175, 350, 525, 700], init_from=str(pre))
    again = _fake_run(tmp_path / "again", batch_size=8, steps=[10], init_from=str(model), keep_evenly=None)

    assert curves.curve_steps(pre) == [875, 1750, 2625, 3500]
    assert curves.curve_steps(model) == [175, 350, 525, 700]
    with pytest.raises(ValueError, match="keep_evenly"):
        curves.curve_steps(again)

    pre_cfg, model_cfg, again_cfg = (workdir_lib.read_config(p) for p in (pre, model, again))
    assert curves.images_before(pre_cfg) == 0
    assert curves.images_seen(pre_cfg, [875, 3500]) == [875 * 32, 3500 * 32]
    # A fine-tuned model's axis starts where the pre-training's ended (its latest checkpoint), in its own batch.
    assert curves.images_before(model_cfg) == 3500 * 32
    assert curves.images_seen(model_cfg, [175, 700]) == [3500 * 32 + 175 * 16, 3500 * 32 + 700 * 16]
    assert curves.images_before(again_cfg) == 3500 * 32 + 700 * 16  # Fine-tuned twice: both runs' images.
    seen = curves.images_seen(model_cfg, curves.curve_steps(model))
    assert seen == sorted(seen) and seen[0] > curves.images_seen(pre_cfg, [3500])[0]

    (tmp_path / "empty").mkdir()
    workdir_lib.write_json(tmp_path / "empty" / "config.json", {"init_from": None, "train": {"batch_size": 4}})
    orphan = _fake_run(tmp_path / "orphan", batch_size=8, steps=[4], init_from=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        curves.images_before(workdir_lib.read_config(orphan))
