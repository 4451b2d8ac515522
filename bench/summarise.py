"""Markdown tables of one benchmark job: our lines, the PyTorch peer's, and the ratios between them.

    python bench/summarise.py bench/results/2026-11-28_h200.jsonl \
        [--peer_fallback bench/results/2026-11-28_h200_peer.jsonl]

Reads JSON lines as ``python -m fadjax.bench`` and the peer (``torch_reference_step.py``) print them
(other lines are ignored). Peer figures missing from the job are taken from ``--peer_fallback`` (an
earlier peer run) and marked ``(stored run)`` there, since a ratio between two jobs is weaker than
one from the same job. Only the standard library is used.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable

OURS = ("train_step", "baseline_step", "sample", "max_batch")


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a file, one per line; anything else is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _peer_train(rows: list[dict], *, batch: int, bf16: bool, compiled: bool) -> dict | None:
    for r in rows:
        if (r.get("peer") == "torch-reference-step" and r.get("batch") == batch and r.get("bf16") is bf16
                and r.get("compiled") is compiled and r.get("align", True) is True and r.get("img_per_s")):
            return r
    return None


def _peer_sampling(rows: list[dict], *, batch: int) -> dict | None:
    for r in rows:
        if r.get("peer") == "torch-reference-unet-forward" and r.get("batch") == batch:
            return r
    return None


def _ours(rows: list[dict], what: str, **match) -> dict | None:
    """The last of our lines for ``what`` matching every ``match`` field."""
    found = None
    for r in rows:
        if r.get("what") == what and r.get("img_per_s") and all(r.get(k) == v for k, v in match.items()):
            found = r
    return found


def summarise(rows: list[dict], fallback: list[dict] | None = None) -> str:
    """The markdown summary of one job's lines (``fallback``: an earlier peer run)."""
    fallback = fallback or []
    ours = [r for r in rows if r.get("what") in OURS]
    peer = [r for r in rows if "peer" in r]
    lines: list[str] = []
    dev = next((r.get("device") for r in ours if r.get("device")), "?")
    date = next((r.get("date") for r in ours if r.get("date")), "?")
    vers = next((f"jax {r.get('jax')}, flax {r.get('flax')}" for r in ours if r.get("jax")), "")
    lines.append(f"### fadjax on {dev} ({date}; {vers})")
    lines.append("")
    lines += _table(
        ["what", "batch", "dtype", "attention", "img/s", "step ms", "TFLOP/s", "MFU (790)", "MFU (989.4)",
         "peak GiB", "compile s", "note"],
        [[r["what"] + (f" ({r['step']})" if r.get("step") else ""), _fmt(r.get("batch")), _fmt(r.get("dtype")),
          _fmt(r.get("attention")), _fmt(r.get("img_per_s"), 2), _fmt(r.get("step_time_ms")),
          _fmt(r.get("tflops")), _pct(r.get("mfu_measured")), _pct(r.get("mfu_spec")), _fmt(r.get("peak_gib"), 2),
          _fmt(r.get("compile_s")), _note(r)] for r in ours])
    skipped = [r for r in rows if r.get("what") == "skipped"]
    if skipped:
        lines += ["", "Skipped by the job's time limit: " + ", ".join(r.get("part", "?") for r in skipped) + "."]

    lines += ["", "### PyTorch peer (the paper's step, same job)", ""]
    peer_rows = []
    for r in peer:
        if r.get("peer") == "torch-reference-step":
            precision = "bf16 autocast" if r.get("bf16") in (True, "True") else "fp32"
            cfg = f"train step, batch {r.get('batch')}, {precision}"
            cfg += ", torch.compile" if r.get("compiled") in (True, "True") else ", eager"
            peer_rows.append([cfg, _fmt(r.get("img_per_s"), 2) + " img/s" if r.get("img_per_s") else
                              "error: " + str(r.get("error", "?"))[:60].replace("|", "/")])
        else:
            peer_rows.append([f"U-Net forward, batch {r.get('batch')}",
                              f"{_fmt(r.get('evals_per_s'), 2)} evals/s = "
                              f"{_fmt(r.get('images_per_s_at_1000_steps'), 4)} img/s at 1000 steps"])
    lines += _table(["configuration", "throughput"], peer_rows) if peer_rows else ["(no peer lines in this job)"]

    def peer_or_stored(find, **kw):
        r = find(peer, **kw)
        if r is not None:
            return r, ""
        r = find(fallback, **kw)
        return r, " (stored run)" if r is not None else ""

    ratios = []
    for label, mine, (ref, tag) in [
        ("train step bf16 b64 vs peer bf16 b64 torch.compile",
         _ours(ours, "train_step", batch=64, dtype="bfloat16"),
         peer_or_stored(_peer_train, batch=64, bf16=True, compiled=True)),
        ("train step bf16 b64 vs peer bf16 b64 eager",
         _ours(ours, "train_step", batch=64, dtype="bfloat16"),
         peer_or_stored(_peer_train, batch=64, bf16=True, compiled=False)),
        ("train step fp32 b64 vs peer fp32 b64 eager",
         _ours(ours, "train_step", batch=64, dtype="float32"),
         peer_or_stored(_peer_train, batch=64, bf16=False, compiled=False)),
        ("train step fp32 b4 vs peer fp32 b4 eager (the paper's setting)",
         _ours(ours, "train_step", batch=4, dtype="float32"),
         peer_or_stored(_peer_train, batch=4, bf16=False, compiled=False)),
        ("train step at max batch vs peer bf16 b64 torch.compile",
         _ours(ours, "max_batch", dtype="bfloat16"),
         peer_or_stored(_peer_train, batch=64, bf16=True, compiled=True)),
    ]:
        if mine and ref:
            ratios.append([label + tag, f"{mine['img_per_s']:.1f} / {ref['img_per_s']:.1f}",
                           f"{mine['img_per_s'] / ref['img_per_s']:.2f}x"])
    ref1, tag1 = peer_or_stored(_peer_sampling, batch=1)
    for s in [r for r in ours if r.get("what") == "sample" and r.get("img_per_s")]:
        name = f"sampling b{s['batch']} {s['dtype']} {s.get('steps')} steps"
        if ref1:
            base = ref1["images_per_s_at_1000_steps"]
            ratios.append([f"{name}, at 1000 steps, vs reference (1 image at a time, 1000 steps){tag1}",
                           f"{s['img_per_s_at_1000_steps']:.4f} / {base:.4f}",
                           f"{s['img_per_s_at_1000_steps'] / base:.1f}x"])
            if s.get("sampler") == "ddim":  # Fewer DDIM steps in place of the reference's 1000 DDPM steps.
                ratios.append([f"{name}, as run (DDIM {s.get('steps')} steps), vs reference (1 image, 1000 steps){tag1}",
                               f"{s['img_per_s']:.3f} / {base:.4f}", f"{s['img_per_s'] / base:.0f}x"])
        same, tag_same = peer_or_stored(_peer_sampling, batch=s["batch"])
        if same and s["batch"] != 1:
            base = same["images_per_s_at_1000_steps"]
            ratios.append([f"{name}, at 1000 steps, vs peer b{s['batch']} fp32 at 1000 steps{tag_same}",
                           f"{s['img_per_s_at_1000_steps']:.4f} / {base:.4f}",
                           f"{s['img_per_s_at_1000_steps'] / base:.1f}x"])
    lines += ["", "### Ratios (ours / peer)", ""]
    lines += _table(["comparison", "img/s", "ratio"], ratios) if ratios else ["(no comparable pairs)"]
    costs = []
    for a in [r for r in ours if r.get("what") == "train_step"]:
        b = _ours(ours, "baseline_step", batch=a.get("batch"), dtype=a.get("dtype"))
        if b:
            costs.append([f"batch {a['batch']} {a['dtype']}", f"{a['img_per_s']:.2f} / {b['img_per_s']:.2f}",
                          f"{100 * (b['img_per_s'] / a['img_per_s'] - 1):+.1f}%"])
    if costs:
        lines += ["", "### Cost of the alignment term (ours: feature-aligned step / baseline step)", ""]
        lines += _table(["setting", "img/s aligned / baseline", "extra time per image"], costs)
    return "\n".join(lines) + "\n"


def _note(r: dict) -> str:
    notes = []
    if r.get("what") == "sample":
        notes.append(f"{r.get('sampler')} {r.get('steps')} steps; {_fmt(r.get('img_per_s_at_1000_steps'), 4)} "
                     f"img/s at 1000 steps")
    if r.get("what") == "max_batch":
        notes.append(f"largest that ran: {r.get('max_batch')} (predicted {r.get('predicted_max_batch')}, "
                     f"stopped by {r.get('stopped_by')})")
    if r.get("attention_requested") not in (None, r.get("attention")):
        notes.append(f"asked for {r.get('attention_requested')}")
    if r.get("finite") is False:
        notes.append("NON-FINITE")
    if r.get("error"):
        notes.append("error: " + str(r["error"])[:80].replace("|", "/"))
    return "; ".join(notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl", help="JSON lines of one job (ours and the peer's).")
    p.add_argument("--peer_fallback", default=None, help="An earlier peer run, for peer lines this job lacks.")
    args = p.parse_args(argv)
    fallback = read_jsonl(args.peer_fallback) if args.peer_fallback else None
    sys.stdout.write(summarise(read_jsonl(args.jsonl), fallback))
    return 0


if __name__ == "__main__":
    sys.exit(main())
