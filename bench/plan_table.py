"""Markdown tables of ``python -m fadjax.bench --what plan`` lines, beside the H200 measurement of the
paper's PyTorch step (``results/2026-11-28_h200_peer.jsonl``).

    python bench/plan_table.py results/2026-12-08_plan_paper.jsonl results/2026-12-08_plan_fast.jsonl
"""
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
PEER = HERE / "results" / "2026-11-28_h200_peer.jsonl"


def _lines(path):
    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _gb(n):
    return f"{n / 1e9:.2f}"


def table(r) -> str:
    m = r.get("memory", {})
    rows = [f"### `{r['config']}`: batch {r['batch']}, {r['dtype']}, {r['params'] / 1e6:.1f} M parameters "
            f"(expert: {r['expert']})", "",
            f"- state: parameters {_gb(r['param_bytes'])} GB, Adam {_gb(r['opt_state_bytes'])} GB, EMA "
            f"{_gb(r['ema_bytes'])} GB; frozen expert {_gb(r['expert_bytes'] or 0)} GB; training images on the device "
            f"{_gb(r['data_bytes'])} GB",
            f"- train step: {r['train_flops_per_image'] / 1e9:.1f} GFLOP per image + "
            f"{r['train_flops_per_step_fixed'] / 1e9:.2f} GFLOP per step (XLA cost analysis, lowered step)",
            f"- one sampling call ({r['sample']['sampler']}, {r['sample']['unet_calls']} U-Net calls, "
            f"{'guided' if r['sample']['guided'] else 'unguided'}): {r['sample']['flops_per_image'] / 1e12:.2f} "
            "TFLOP per image"]
    if m:
        rows.append(f"- program memory (CPU compile, {m['source'].split(':')[0]}): {_gb(m['fixed_bytes'])} GB per step + "
                    f"{m['per_image_bytes'] / 1e6:.1f} MB per image (activations at batch {r['batch']}: "
                    f"{_gb(m['activation_bytes_at_batch'])} GB)")
    rows += ["", "| accelerator | memory (usable) | largest batch | peak TFLOP/s | predicted step at batch "
             f"{r['batch']} | predicted img/s | img/s at the largest batch |", "|---|---|---|---|---|---|---|"]
    for name, a in r["accelerators"].items():
        rows.append(f"| {name} | {_gb(a['memory_bytes'])} GB ({_gb(a['usable_bytes'])}) | {a.get('max_batch', '-')} "
                    f"| {a['peak_tflops']} | {a['predicted_step_ms']} ms | {a['predicted_img_per_s']} | "
                    f"{a.get('predicted_img_per_s_at_max_batch', '-')} |")
    share = next(iter(r["accelerators"].values()))["share_of_peak"]
    rows += ["", f"Predictions at {share:.0%} of the peak (an assumption), not measurements."]
    return "\n".join(rows)


def peer_rows(plans) -> str:
    """The H200 PyTorch measurements, and the share of peak each implies with our FLOPs per image."""
    paper = next((r for r in plans if r["params"] > 1e8), None)
    out = ["| H200, PyTorch reference step (measured) | img/s | implied share of peak (our FLOPs/image) |", "|---|---|---|"]
    for p in _lines(PEER):
        if p.get("peer") != "torch-reference-step":
            continue
        flops = paper["train_flops_per_image"] if paper else None
        peak = 989.4 if p["bf16"] else 494.7
        share = f"{p['img_per_s'] * flops / (peak * 1e12):.1%} of {peak}" if flops else "-"
        out.append(f"| batch {p['batch']}, {'bf16' if p['bf16'] else 'fp32'}, "
                   f"{'compiled' if p['compiled'] else 'eager'} | {p['img_per_s']} | {share} |")
    return "\n".join(out)


HEADER = """# GPU and TPU plan of the paper and fast presets (predictions, not measurements)

Made on a CPU by `python -m fadjax.bench --what plan --config configs/feature_aligned.py` (the paper's
settings) and `--config configs/feature_aligned.py:fast`, with `--jsonl` writing the lines beside this file;
tables by `python bench/plan_table.py <those files>`. No fadjax step has run on a GPU or TPU yet: every
number below is computed, the step times are predictions at an assumed share of peak FLOP/s.

How: FLOPs from XLA's cost analysis of the lowered step (XLA attention), program memory from XLA's memory
analysis of the step compiled for the CPU (attention chosen as on a TPU or a GPU without cuDNN; a GPU or TPU
compiler fuses and schedules differently), both at the batch and at twice it, split into a per-step and a
per-image part. The largest batch fits 90% of the accelerator's memory. Peaks: `fadjax/bench.py`'s
`ACCELERATORS` (datasheets; float32 = TF32 on the GPUs, one bf16 pass on TPUs)."""


if __name__ == "__main__":
    plans = [r for path in sys.argv[1:] for r in _lines(path) if r.get("what") == "plan"]
    print(HEADER)
    print()
    print("\n\n".join(table(r) for r in plans))
    print()
    print("## Beside the H200 measurement of the paper's PyTorch step (`../shared/peers/h200_2026-11-28.jsonl`)")
    print()
    print(peer_rows(plans))
    print()
    print("The implied share is what the measured img/s would mean with our FLOPs per image of the paper preset's "
          "aligned step (PyTorch's own FLOPs may differ: its step also runs CLIP's text encoder). PyTorch leaves "
          "TF32 off for matrix products by default, so its fp32 share is against a peak it does not use.")
