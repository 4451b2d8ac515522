"""One process of tests/test_distributed.py's 2-process test of the host input path's reading.

  python tests/host_feed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID

Each process (2 CPU devices) builds the same small set, feeds 12 steps of a global batch of 8 over the
4 devices with a HostFeed, and checks on its own devices that the host path's drawn batch equals the
device path's, and that it read only the examples of its own rows. Prints ``OK <lo> <hi> <reads>``.
"""
import sys

import jax
import numpy as np

coordinator, num_processes, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)

from fadjax.data import host_feed, pipeline  # noqa: E402
from fadjax.train import common  # noqa: E402

rng = np.random.default_rng(0)  # The same set on every process.
images = rng.integers(0, 256, (29, 6, 6, 1), dtype=np.uint8)
labels = (np.arange(29) % 4).astype(np.int32)
reads = []


class Recording:
    """The images, recording every example index read."""

    shape, dtype, ndim = images.shape, images.dtype, images.ndim

    def __getitem__(self, key):
        reads.extend(np.atleast_1d(key).tolist())
        return images[key]


par = common.Parallel("sharded", jax.sharding.Mesh(np.asarray(jax.devices()), (common.DATA_AXIS,)), jax.device_count())
sources = [pipeline.Source("train", 29, 8)]
keys = pipeline.RunKeys(7)


@jax.jit
def draw(step, data):
    x, y, _ = pipeline.draw_examples(keys, step, data, sources, hflip=True, vflip=True, transpose=True)
    return jax.lax.with_sharding_constraint(x, par.batch_sharded), jax.lax.with_sharding_constraint(y, par.batch_sharded)


device_data = par.put_replicated({"images": images, "labels": labels})
feed = host_feed.HostFeed(keys, {"images": Recording(), "labels": labels}, sources, par, start=0, stop=12, depth=2)
expected_reads = []
for step in range(12):
    expected_reads += feed.indices(step)[0][feed.lo:feed.hi].tolist()
    for a, b in zip(draw(step, feed.get(step)), draw(step, device_data)):
        for sa, sb in zip(a.addressable_shards, b.addressable_shards):
            assert sa.index == sb.index
            np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data), err_msg=f"step {step}")
feed.close()
assert (feed.lo, feed.hi) == (4 * process_id, 4 * process_id + 4), (feed.lo, feed.hi)
assert sorted(reads) == sorted(expected_reads), (reads, expected_reads)
print("OK", feed.lo, feed.hi, len(reads), flush=True)
