"""The host input path against the device path (issue 31): cache build, peak memory, step time, 2 processes.

  python bench/host_feed.py all --tiles 100000 --out /tmp/fadjax_host_feed \
      --jsonl bench/results/$(date +%F)_cpu-2core_host-feed.jsonl

Steps (each measured in a fresh child process, one JSON line each, on stdout and appended to --jsonl):
  make     a folder of --tiles generated 64x64 RGB PNG tiles (the demo's textures, 8 Kather class folders);
  build    its cache at 64x64x3 (time, peak RSS: built in chunks, never the whole set in memory), and the
           cpu preset's 32x32x1 cache;
  train    the cpu preset's diffusion step (configs/baseline.py:cpu: 32x32x1, batch 32) for --steps steps on
           that folder, data.placement=device then host: img/s (median of the logged windows after the first),
           peak RSS and, on an accelerator, the device's peak bytes in use;
  train2   the same on 2 processes x 1 CPU device each (train.py with --coordinator), each process reading
           only its half of every batch on the host path;
  memory   the same U-Net for --mem_steps steps on the 64x64x3 images (a 1.2 GB training split at 100k
           tiles), device then host: peak RSS (the device path holds the split in host memory twice over,
           the host path only what the map has paged in; RssAnon is what it cannot give back).
Target: the host path at most 5% slower than the device path (the prefetch hides the reads).
Delete --out afterwards (100k tiles: ~1.5 GB of PNGs and caches).

Run it alone on the machine: it times training steps.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import socket
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # This checkout's fadjax, whatever is installed.
CLASSES = ("01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE", "08_EMPTY")


def _memory() -> dict:
    """Peak RSS (VmHWM) and the current anonymous / file-backed RSS of this process, in MB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key.lower() + "_mb"] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _emit(row: dict, jsonl: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(line + "\n")


def make(args) -> dict:
    from PIL import Image
    from fadjax.data import demo
    root = pathlib.Path(args.out) / "tiles"
    t0 = time.perf_counter()
    per_class = args.tiles // len(CLASSES)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / name / f"tile_{i:06d}.png"
            if not path.exists():
                Image.fromarray(demo.image(c % len(demo.CLASS_NAMES), 1000003 * c + i, image_size=64, channels=3)).save(path)
    return {"what": "make", "tiles": per_class * len(CLASSES), "seconds": time.perf_counter() - t0}


def build(args) -> dict:
    from fadjax import data
    cache = pathlib.Path(args.out) / f"cache_{args.size}x{args.channels}.npz"
    if cache.exists():
        cache.unlink()
    t0 = time.perf_counter()
    ds = data.load(f"folder:{pathlib.Path(args.out) / 'tiles'}", image_size=args.size, channels=args.channels,
                   cache=str(cache), progress=False, mmap=True)
    seconds = time.perf_counter() - t0
    return {"what": "cache_build", "size": args.size, "channels": args.channels, "images": len(ds),
            "image_bytes": int(ds.images.nbytes), "seconds": seconds, **_memory()}


def _config(args, workdir: pathlib.Path):
    from fadjax import config_lib
    c = config_lib.load("baseline", "cpu")
    c.data.source = f"folder:{pathlib.Path(args.out) / 'tiles'}"
    c.data.image_size, c.data.channels = args.size, args.channels
    c.data.cache = str(pathlib.Path(args.out) / f"cache_{args.size}x{args.channels}.npz")
    c.data.placement = args.placement
    c.train.num_steps = args.steps
    c.train.log_every = args.log_every
    c.train.checkpoint_every = args.steps
    c.train.keep_evenly = None
    c.train.progress = False
    if args.num_processes > 1:
        c.num_devices = None  # One CPU device per process: the global batch over both.
    return c


def train(args) -> dict:
    from fadjax import distributed
    if args.num_processes > 1:
        distributed.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
    import jax
    from fadjax import train as train_lib
    workdir = pathlib.Path(args.out) / f"run_{args.placement}_{args.num_processes}p_{args.size}x{args.channels}"
    summary = train_lib.run(_config(args, workdir), workdir)
    row = {"what": "train", "size": args.size, "channels": args.channels, "placement": args.placement,
           "path": summary.get("input_path"),
           "processes": jax.process_count(), "process": jax.process_index(), "devices": jax.device_count(),
           "backend": jax.default_backend(), "steps": args.steps, **_memory()}
    if jax.process_index() == 0:
        rates = [json.loads(l)["img_per_s"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
        rates = rates[1:-1] if len(rates) > 2 else rates  # The first window holds the warm-up; the last the final save.
        row.update(img_per_s=statistics.median(rates), step_ms=1000 * 32 / statistics.median(rates),
                   img_per_s_windows=rates)
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
        if stats.get("peak_bytes_in_use"):
            row["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    except Exception:  # noqa: BLE001
        pass
    return row


def _child(argv: list[str], *, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *argv], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=env or dict(os.environ))


def _rows(procs) -> list[dict]:
    rows = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"child failed ({p.returncode}): {p.args}")
        rows += [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return rows


def run_all(args) -> None:
    import shutil
    for old in pathlib.Path(args.out).glob("run_*"):  # A rerun times fresh runs, not a finished one.
        shutil.rmtree(old)
    common = ["--out", args.out]
    env1 = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    rows = _rows([_child(["make", "--tiles", str(args.tiles), *common])])
    rows += _rows([_child(["build", "--size", "64", "--channels", "3", *common])])
    rows += _rows([_child(["build", "--size", "32", "--channels", "1", *common])])
    small = ["--size", "32", "--channels", "1"]
    for placement in ("device", "host"):
        rows += _rows([_child(["train", "--placement", placement, "--steps", str(args.steps), *small, *common],
                              env=env1)])
    for placement in ("device", "host"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rows += _rows([_child(["train", "--placement", placement, "--steps", str(args.steps), "--num_processes", "2",
                               "--process_id", str(i), "--coordinator", f"127.0.0.1:{port}", *small, *common],
                              env=env1) for i in range(2)])
    for placement in ("device", "host"):
        rows += _rows([_child(["train", "--placement", placement, "--steps", str(args.mem_steps), "--log_every", "5",
                               "--size", "64", "--channels", "3", *common], env=env1)])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for row in rows:
        _emit({**row, "commit": commit, "cores": os.cpu_count(),
               "command": "python bench/host_feed.py " + " ".join(sys.argv[1:])}, args.jsonl)
    rate = {(r["placement"], r["processes"]): r["img_per_s"] for r in rows
            if r["what"] == "train" and "img_per_s" in r and r["size"] == 32}
    for n in (1, 2):
        if ("device", n) in rate and ("host", n) in rate:
            print(f"{n} process(es): host path {rate[('host', n)]:.1f} img/s vs device {rate[('device', n)]:.1f}: "
                  f"{100 * (rate[('device', n)] / rate[('host', n)] - 1):+.1f}% step time", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("all", "make", "build", "train"))
    p.add_argument("--out", default="/tmp/fadjax_host_feed")
    p.add_argument("--tiles", type=int, default=100_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--placement", default="host")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--mem_steps", type=int, default=20)
    p.add_argument("--log_every", type=int, default=20)
    p.add_argument("--coordinator")
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--jsonl")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.what == "all":
        return run_all(args)
    row = {"make": make, "build": build, "train": train}[args.what](args)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
