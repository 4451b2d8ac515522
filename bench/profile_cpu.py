"""Where the time of one CPU train step goes: XLA's own per-operation timings, grouped by kind.

    python bench/profile_cpu.py --config configs/baseline.py:cpu --batch 32 --out out/profile_cpu

Builds the trainer's compiled step (``fadjax.bench.build_train_step``: random weights, synthetic
data, the config's shapes), runs it under ``jax.profiler`` and sums the time of every XLA operation
(the CPU runtime's thunks) over the traced steps. Each operation is grouped by what its HLO
instruction computes: a convolution, a matrix product (attention, projections), a reduction
(GroupNorm statistics, losses), element-wise work (with the broadcasts of its operands), data
movement (copies, transposes, slices, pads, concatenations) or a loop (chunked attention, the
sampler). Prints a table and writes ``OUT/profile.json``; the raw trace is in ``OUT/trace``, the
compiled program in ``OUT/program.hlo``.
"""
from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=False)
flags.DEFINE_integer("batch", None, "Batch size (default: the config's).")
flags.DEFINE_integer("steps", 5, "Traced steps (after 2 untraced ones).")
flags.DEFINE_string("out", "out/profile_cpu", "Output folder.")
flags.DEFINE_enum("what", "baseline_step", ["baseline_step", "train_step"], "The baseline's or the aligned step.")
flags.DEFINE_string("expert_arch", "resnet18", "Random expert of the aligned step.")
flags.DEFINE_integer("expert_width", 16, "Its stem width.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

# HLO opcodes by kind (for a fusion: the kind of the most telling instruction inside it).
KINDS = (
    ("convolution", {"convolution"}),
    ("matmul", {"dot"}),
    ("loop", {"while", "call", "conditional"}),
    ("reduction", {"reduce", "reduce-window", "select-and-scatter", "sort"}),
    # A broadcast, reshape or bitcast inside an element-wise fusion only indexes its operands (a GroupNorm's
    # per-channel scale, a bias): such a fusion is element-wise work, not data movement.
    ("data movement", {"copy", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "pad",
                       "concatenate", "gather", "scatter", "reverse"}),
)
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? ([a-z][\w\-]*)\(", re.M)
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", re.M | re.S)


def hlo_kinds(hlo: str) -> dict[str, str]:
    """Instruction name -> kind, for every instruction of the program (fusions by their content)."""
    bodies = {m.group(1): m.group(2) for m in _COMP.finditer(hlo)}
    opcodes = {}
    for body in bodies.values():
        for m in _INSTR.finditer(body):
            opcodes[m.group(1)] = m.group(2)

    def ops_of(body: str, depth=0) -> set[str]:
        ops = {m.group(2) for m in _INSTR.finditer(body)}
        if depth < 3:
            for callee in _CALLS.findall(body):
                ops |= ops_of(bodies.get(callee, ""), depth + 1)
        return ops

    kinds = {}
    for body in bodies.values():
        for line in body.splitlines():
            m = _INSTR.match(line)
            if not m:
                continue
            name, op = m.groups()
            ops = {op}
            if op in ("fusion", "custom-call"):
                callee = _CALLS.search(line)
                ops = ops_of(bodies.get(callee.group(1), "")) if callee else ops
            kinds[name] = next((k for k, members in KINDS if ops & members), "element-wise")
    return kinds


def main(argv):
    del argv
    import jax
    from fadjax import bench

    config = bench.prepare_config(FLAGS.config, what=FLAGS.what, batch=FLAGS.batch or FLAGS.config.train.batch_size,
                                  expert_arch=FLAGS.expert_arch)
    step_fn, args, meta, _ = bench.build_train_step(config, expert_arch=FLAGS.expert_arch,
                                                    expert_width=FLAGS.expert_width)
    compiled = step_fn.lower(*args).compile()
    hlo = compiled.as_text()
    kinds = hlo_kinds(hlo)
    state, rest = args[0], args[1:]
    for _ in range(2):  # Warm-up.
        state, m = compiled(state, *rest)
    jax.block_until_ready(m)
    t0 = time.perf_counter()  # The step's wall time, untraced.
    for _ in range(FLAGS.steps):
        state, m = compiled(state, *rest)
    jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / FLAGS.steps
    out = pathlib.Path(FLAGS.out)
    trace_dir = out / "trace"
    jax.profiler.start_trace(str(trace_dir))
    for _ in range(FLAGS.steps):
        state, m = compiled(state, *rest)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
    trace = sorted(trace_dir.rglob("*.trace.json.gz"))[-1]
    events = json.load(gzip.open(trace))["traceEvents"]
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M" and
               e.get("name") == "thread_name"}
    by_kind, by_op = collections.Counter(), collections.Counter()
    busy = 0.0  # The XLA runtime's own threads executing the program (ThunkExecutor::Execute).
    for e in events:
        if e.get("ph") != "X" or not threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA"):
            continue
        name = e["name"]
        if name == "ThunkExecutor::Execute":
            busy += float(e.get("dur", 0.0))
        if name not in kinds:
            continue
        us = float(e.get("dur", 0.0))
        by_kind[kinds[name]] += us
        by_op[name] += us
    total = sum(by_kind.values()) or 1.0
    rows = [(k, v / FLAGS.steps / 1e3, v / total) for k, v in by_kind.most_common()]
    result = {"what": FLAGS.what, "batch": config.train.batch_size,
              "step_wall_ms": wall * 1e3, "img_per_s": config.train.batch_size / wall,
              "op_time_ms_per_step": total / FLAGS.steps / 1e3, "executor_ms_per_step": busy / FLAGS.steps / 1e3,
              "by_kind": [{"kind": k, "ms_per_step": ms, "share": sh} for k, ms, sh in rows],
              "top_ops": [{"op": k, "kind": kinds[k], "ms_per_step": v / FLAGS.steps / 1e3}
                          for k, v in by_op.most_common(15)],
              "meta": meta, "xla_flags": __import__("os").environ.get("XLA_FLAGS", "")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "program.hlo").write_text(hlo)  # The compiled program, to read what an operation is.
    (out / "profile.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"step {wall * 1e3:.1f} ms ({config.train.batch_size / wall:.1f} img/s, untraced); XLA's threads executed "
          f"{busy / FLAGS.steps / 1e3:.1f} ms per step, its operations {total / FLAGS.steps / 1e3:.1f} ms "
          f"(summed over threads), by kind:")
    for k, ms, sh in rows:
        print(f"  {k:<14s} {ms:8.1f} ms  {100 * sh:5.1f}%")
    print("top operations:")
    for r in result["top_ops"][:10]:
        print(f"  {r['op']:<40s} {r['kind']:<14s} {r['ms_per_step']:8.1f} ms")


if __name__ == "__main__":
    app.run(main)
