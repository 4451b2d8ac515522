"""Runs a subset of the PyTorch peer's measurements (its own functions), one JSON line each.

    python3 bench/peer_parts.py out/peer/torch_reference_step.py core   # bf16 b64 compiled + eager, 1-image sampling
    python3 bench/peer_parts.py out/peer/torch_reference_step.py rest   # fp32 b4 and b64, batch-70 sampling

The two parts together are what the peer's own ``__main__`` runs; split, the job can run the
headline figures first and the rest only when time is left.
"""
import importlib.util
import json
import sys

PARTS = {
    "core": ([dict(batch=64, amp=True, compile_=True), dict(batch=64, amp=True)], [1]),
    "rest": ([dict(batch=4), dict(batch=64)], [70]),
}


def main(path: str, part: str) -> None:
    spec = importlib.util.spec_from_file_location("torch_reference_step", path)
    peer = importlib.util.module_from_spec(spec)
    # torch.compile (dynamo) looks the module up by name while it traces: register it first.
    sys.modules[spec.name] = peer
    spec.loader.exec_module(peer)
    train, sampling = PARTS[part]
    for kw in train:
        try:
            print(json.dumps(peer.bench(**kw)), flush=True)
        except Exception as e:  # noqa: BLE001  (as the peer's own loop: keep going)
            print(json.dumps(dict(peer="torch-reference-step", batch=kw["batch"], align=True, bf16=kw.get("amp", False),
                                  compiled=kw.get("compile_", False), error=repr(e)[:300])), flush=True)
    for b in sampling:
        print(json.dumps(peer.bench_sampling(b, steps=50)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
