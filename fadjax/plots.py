"""Matplotlib figures shared by ``evaluate`` and ``report`` (Agg backend, PNG files)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def confusion(cm: np.ndarray, row_names: Sequence[str], col_names: Sequence[str], path: str | os.PathLike, *,
              title: str) -> None:
    """Confusion matrix with a count in every cell; rows true classes, columns predictions.

    Args:
      cm: ``[R, K]`` counts.
      row_names: names of the ``R`` true classes.
      col_names: names of the ``K`` predicted classes.
      path: output PNG.
      title: figure title.
    """
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(col_names), 1.0 + 0.7 * len(row_names)))
    row_sums = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(cm / row_sums, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] / row_sums[i, 0] > 0.5 else "black")
    ax.set_xticks(range(len(col_names)), col_names, rotation=45, ha="right")
    ax.set_yticks(range(len(row_names)), row_names)
    ax.set_xlabel("predicted by the expert")
    ax.set_ylabel("true class")
    ax.set_title(title)
    _save(fig, path)


def grouped_bars(values: Mapping[str, Mapping[str, float]], categories: Sequence[str], path: str | os.PathLike, *,
                 title: str, ylabel: str, xlabel: str = "class") -> None:
    """Grouped bars: one group per category, one bar per series (``values[series][category]``)."""
    series = list(values)
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(categories) * max(1, len(series)) / 2), 4.0))
    for k, name in enumerate(series):
        heights = [values[name].get(c, np.nan) for c in categories]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, categories, rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def per_seed(values: Mapping[str, Mapping[int, float]], path: str | os.PathLike, *, title: str,
             ylabel: str = "generation accuracy") -> None:
    """One line per run over seeds, with its mean as a dashed line (paper Fig. 4)."""
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for name, by_seed in values.items():
        seeds = sorted(by_seed)
        line, = ax.plot(seeds, [by_seed[s] for s in seeds], marker="o", label=name)
        ax.axhline(float(np.mean([by_seed[s] for s in seeds])), color=line.get_color(), linestyle="--",
                   label=f"{name} mean")
    ax.set_xlabel("seed")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    _save(fig, path)


def curves(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path: str | os.PathLike, *,
           title: str, xlabel: str = "step") -> None:
    """One panel per quantity (``panels[quantity][run] = (steps, values)``), side by side."""
    names = list(panels)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.5 * max(len(names), 1), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run, (x, y) in panels[name].items():
            ax.plot(x, y, label=run)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save(fig, path)


def image_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | os.PathLike, *, title: str) -> None:
    """Rows of synthetic then real images per class (paper Figs. 7-8).

    Args:
      rows: ``(class_name, synthetic [n,H,W,C] uint8, real [m,H,W,C] uint8)`` per class.
      path: output PNG.
      title: figure title.
    """
    n = max((len(s) for _, s, _ in rows), default=0)
    m = max((len(r) for _, _, r in rows), default=0)
    cols = max(n + m, 1)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols, 1.25 * len(rows) + 0.6), squeeze=False)
    for r, (name, synth, real) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            img = synth[c] if c < len(synth) else (real[c - n] if n <= c < n + len(real) else None)
            if img is not None:
                img = np.asarray(img)
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            if r == 0 and c in (0, n):
                ax.set_title("synthetic" if c == 0 and n else "real", fontsize=9, loc="left")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center")
    fig.suptitle(title)
    _save(fig, path)


def _centre_err(entry, scale: float = 1.0) -> tuple[float, list[float]]:
    """``(bar height, [below, above])`` of a utility summary, scaled.

    A distribution entry (with ``value``, on all generated images) has no error bar (its interval
    is over per-seed means, drawn separately); any other bar is its ``mean`` with its ``ci95``.
    """
    if not entry:
        return np.nan, [0.0, 0.0]
    centre = entry.get("value", entry.get("mean"))
    centre = np.nan if centre is None else float(centre) * scale
    lo, hi = (entry.get("ci95") or [None, None])[:2]
    if "value" in entry or lo is None or hi is None:
        return centre, [0.0, 0.0]
    return centre, [max(centre - lo * scale, 0.0), max(hi * scale - centre, 0.0)]


def utility(results: Mapping[str, Mapping], path: str | os.PathLike, *, title: str = "Utility of the synthetic data"
            ) -> None:
    """The utility metrics of several models (``results[model] = fadjax.utility.utility_metrics(...)``).

    Four panels: TSTR vs TRTR accuracy (95% intervals over classifier seeds); augmentation gain in
    points (interval, zero line); precision and recall in the judge's features; Fréchet distance in
    the judge's features. Distribution panels show the value on all generated images, per-seed
    means with their intervals as points, and the real-vs-real reference as dashed lines.
    """
    names = list(results)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(max(14.0, 3.2 * 4 * max(1, len(names)) / 2), 4.0))

    def bars(ax, offsets_keys, scale=1.0):
        width = 0.8 / len(offsets_keys)
        for i, (key, label) in enumerate(offsets_keys):
            cs, errs = zip(*[_centre_err(results[n].get(key), scale) for n in names]) if names else ((), ())
            pos = x + (i - (len(offsets_keys) - 1) / 2) * width
            ax.bar(pos, cs, width, yerr=np.array(errs).T if errs else None, capsize=4, label=label)
            for n, p in zip(names, pos):  # Per-seed means with intervals of the distribution metrics.
                e = results[n].get(key) or {}
                if "value" in e and e.get("mean") is not None:
                    lo, hi = (e.get("ci95") or [None, None])[:2]
                    m = e["mean"] * scale
                    yerr = None if lo is None or hi is None else [[m - lo * scale], [hi * scale - m]]
                    ax.errorbar([p], [m], yerr=yerr, fmt="o", color="black", ms=3, capsize=3)
        ax.set_xticks(x, names, rotation=20, ha="right")

    ax = axes[0]
    bars(ax, [("tstr_accuracy", "TSTR (trained on generated)"), ("trtr_accuracy", "TRTR (same number of real)")])
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("real-validation accuracy")
    ax.set_title("train on synthetic, test on real")
    ax.legend(fontsize="small")

    ax = axes[1]
    bars(ax, [("augment_gain", "with minus without generated")], scale=100.0)
    ax.axhline(0.0, color="black", linewidth=0.8)
    frac = next((r.get("augment", {}).get("fraction") for r in results.values() if r.get("augment")), None)
    ax.set_ylabel("accuracy gain (points)")
    ax.set_title("augmentation gain" + (f" ({100 * frac:.0f}% of the real train split)" if frac else ""))

    for ax, keys, ylabel in ((axes[2], [("precision", "precision"), ("recall", "recall")], "share"),
                             (axes[3], [("fd_judge2", "Fréchet distance")], "FD in judge features")):
        bars(ax, keys)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (key, label) in enumerate(keys):
            refs = [(r.get("real_vs_real") or {}).get(key, {}).get("mean") for r in results.values()]
            refs = [v for v in refs if v is not None]
            if refs:
                ax.axhline(float(np.mean(refs)), color=colours[i % len(colours)], linestyle="--",
                           label=f"{label}: real vs real")
        ax.set_ylabel(ylabel)
        ax.set_xlabel("bars: all generated images; dots: mean over seeds, 95% CI", fontsize="small")
        ax.legend(fontsize="small")
    axes[2].set_ylim(0.0, 1.05)
    axes[2].set_title("precision / recall (k-NN, k=3)")
    axes[3].set_title("FD in the judge's pooled features\n(not Inception-FID)")
    fig.suptitle(title)
    _save(fig, path)


def learning_curves(series: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike, *, title: str,
                    chance: float | None = None, xlabel: str = "training images seen",
                    marks: Mapping[str, float] | None = None) -> None:
    """FD and generation accuracy along training, one line per run (``fadjax.curves``), two panels.

    Args:
      series: ``series[run] = {"images_seen": [...], "fd": [...], "accuracy": [...]}`` (accuracy a fraction).
      path: output PNG.
      title: figure title.
      chance: accuracy of guessing (a dotted line); None = none.
      xlabel: the x axis.
      marks: vertical dashed lines in both panels, ``{label: x}`` (e.g. where fine-tuning starts).

    The FD axis is logarithmic when its values span more than a factor of 20 (early checkpoints are far).
    """
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    for name, s in series.items():
        x = np.asarray(s["images_seen"], np.float64)
        ax_fd.plot(x, s["fd"], marker="o", label=name)
        ax_acc.plot(x, s["accuracy"], marker="o", label=name)
    fds = [v for s in series.values() for v in s["fd"] if v is not None and v > 0]
    if fds and max(fds) > 20 * min(fds):
        ax_fd.set_yscale("log")
    ax_fd.set_ylabel("FD to real validation (judge features)")
    ax_fd.set_title("Fréchet distance (lower is better)")
    if chance is not None:
        ax_acc.axhline(chance, color="gray", linestyle=":", label="chance")
    ax_acc.set_ylim(0.0, 1.05)
    ax_acc.set_ylabel("generation accuracy")
    ax_acc.set_title("generation accuracy (higher is better)")
    for ax in (ax_fd, ax_acc):
        for i, (label, x) in enumerate((marks or {}).items()):
            ax.axvline(x, color="black", linestyle="--", linewidth=0.8, alpha=0.6, label=label if i == 0 else None)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save(fig, path)
