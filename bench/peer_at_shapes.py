"""Runs the PyTorch peer's own train-step benchmark at other shapes: one JSON line per measurement.

    python3 bench/peer_at_shapes.py ../shared/peers/torch_reference_step.py --image_size 32 \
        --block_out_channels 32,64,128 --attention_levels 2 --heads 4 --cross_dim 128 --batch 32

The peer (the paper's feature-aligned step: diffusers U-Net, CLIP text features every step, a ResNet50
expert on x_t with a forward hook, Linear projection, Adam) is loaded as a module and run with its own
``bench`` function. Only its shapes change: its U-Net config dict (``TINY_SD``: widths, which levels carry
cross-attention blocks, heads, context width) and the side of its synthetic images, which its code writes
as ``64`` (its module-level ``torch`` is replaced by a view of torch whose ``rand`` draws the requested
side). Its expert stays its own (torchvision's ResNet50 when installed, else transformers' ResNet50).
"""
import argparse
import importlib.util
import json
import sys
import types


def load_peer(path: str):
    spec = importlib.util.spec_from_file_location("torch_reference_step", path)
    peer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = peer  # torch.compile (dynamo) looks the module up by name.
    spec.loader.exec_module(peer)
    return peer


def at_side(torch, side: int):
    """A stand-in for the ``torch`` module whose ``rand(B, C, H, W)`` draws ``B x C x side x side``."""
    view = types.ModuleType("torch_at_side")
    view.__dict__.update(torch.__dict__)

    def rand(*shape, **kw):
        if len(shape) == 4:
            shape = (shape[0], shape[1], side, side)
        return torch.rand(*shape, **kw)

    view.rand = rand
    return view


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("peer", help="path of torch_reference_step.py")
    p.add_argument("--image_size", type=int, required=True)
    p.add_argument("--block_out_channels", required=True, help="e.g. 32,64,128")
    p.add_argument("--attention_levels", default=None, help="levels with cross-attention blocks, e.g. 1,2 (default all)")
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--cross_dim", type=int, required=True)
    p.add_argument("--norm_num_groups", type=int, default=None, help="GroupNorm groups (default: diffusers' 32)")
    p.add_argument("--batch", type=int, action="append", required=True, help="repeatable")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: the peer's)")
    p.add_argument("--align", choices=("on", "off", "both"), default="on",
                   help="time the aligned step, the step without the alignment, or both (the peer's alignment hooks\n"
                        "down block 2 and projects to the last block's width, which fits only three levels)")
    args = p.parse_args(argv)

    peer = load_peer(args.peer)
    widths = tuple(int(v) for v in args.block_out_channels.split(","))
    n = len(widths)
    levels = set(range(n)) if args.attention_levels is None else {int(v) for v in args.attention_levels.split(",")}
    peer.TINY_SD.update(
        block_out_channels=widths, cross_attention_dim=args.cross_dim, attention_head_dim=args.heads,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("CrossAttnUpBlock2D" if n - 1 - j in levels else "UpBlock2D" for j in range(n)),
        sample_size=args.image_size)
    if args.norm_num_groups is not None:
        peer.TINY_SD["norm_num_groups"] = args.norm_num_groups
    peer.torch = at_side(peer.torch, args.image_size)
    shapes = {"image_size": args.image_size, "block_out_channels": list(widths), "attention_levels": sorted(levels),
              "heads": args.heads, "cross_dim": args.cross_dim,
              "norm_num_groups": peer.TINY_SD.get("norm_num_groups", 32)}
    for batch in args.batch:
        for align in {"on": (True,), "off": (False,), "both": (True, False)}[args.align]:
            try:
                line = peer.bench(batch=batch, align=align, steps=args.steps)
            except Exception as e:  # noqa: BLE001  (keep going, as the peer's own loop)
                line = dict(peer="torch-reference-step", batch=batch, align=align, error=repr(e)[:300])
            print(json.dumps({**line, **shapes}), flush=True)


if __name__ == "__main__":
    main()
