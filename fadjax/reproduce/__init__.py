"""The paper's comparison end to end: ``python -m fadjax.reproduce``.

    python -m fadjax.reproduce --data folder:/path/to/tiles --out reports/paper --preset paper
    python -m fadjax.reproduce --data folder:/path/to/tiles --out reports/fast --preset fast
    python -m fadjax.reproduce --preset tiny            # built-in demo data, a CPU in a few minutes
    python -m fadjax.reproduce --data tfds:colorectal_histology --preset fast

One command trains the expert (ResNet50, the alignment target and the paper's judge), a second
judge (another architecture and seed, the same split), the baseline, the model aligned on x_t
and the one aligned on x0 (Table I); samples every model with the same seeds; judges every model
with both judges; and writes ``report.md``, ``summary.json`` and figures. Layout of OUT::

    runs/{expert,judge2,baseline,fad_xt,fad_x0}   training workdirs (fadjax.train)
    gens/<model>                                   generated images (fadjax.sample)
    eval/<model>, eval2/<model>                    judged by the expert / by the second judge
    report_expert/, report_judge2/                 fadjax.report comparisons, one per judge
    curves/<run>                                   learning curves: samples of the evenly kept checkpoints
                                                   of the pre-training and each model, judged (fadjax.curves)
    report.md, summary.json, accuracy_by_judge.png the combined report
    stages.json                                    fingerprints, wall times, exact commands
    cache/                                         decoded data (unless --cache_dir)

Every stage is resumable: run the same command again after an interruption. Presets are in
:mod:`fadjax.reproduce.presets`.
"""
from fadjax.reproduce.pipeline import ReproduceError, run_all
from fadjax.reproduce.presets import PRESETS, PresetError, build, deviations

__all__ = ["PRESETS", "PresetError", "ReproduceError", "build", "deviations", "run_all"]
