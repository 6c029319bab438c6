"""Time to the first batch of a resume at 90% of an epoch: window order (arithmetic) vs the old
buffer order (re-read and skip), side by side, on a synthetic many-shard cache.

Writes a synthetic cache (exact mode, bench_loader.synthetic_cache) into a temp dir, hands out
90% of an epoch, saves the cursor, then times a fresh dataset from the cursor to its first
batch, for each order; also counts the shards each resume opens.

    python bench/bench_resume.py [--shards 40] [--per-shard 32] [--length 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loader import synthetic_cache

from kdcache.cache import open_cache
from kdcache.trainer.data import BUFFER_ORDER, WINDOW_ORDER, CacheDataset


def resume_cost(cache, order: str, batch: int, reps: int) -> tuple[float, int]:
    """(best seconds from the cursor to the first batch, shards opened) at 90% of the epoch."""
    best, opened = float("inf"), 0
    for _ in range(reps):
        first = CacheDataset(cache, batch_size=batch, seed=1, partitions=1)
        first.order = order
        total = first.num_batches()
        stream = first.epoch_batches()
        for _ in range(int(0.9 * total)):
            next(stream)
        state = first.state_dict()
        stream.close()
        seen: list[str] = []
        original = cache.source.load

        def logged(info, verify=True, original=original, seen=seen):
            seen.append(info.name)
            return original(info, verify)

        cache.source.load = logged
        try:
            start = time.perf_counter()
            resumed = CacheDataset(cache, batch_size=batch, seed=1, partitions=1)
            resumed.load_state_dict(state)
            next(resumed.epoch_batches())
            best = min(best, time.perf_counter() - start)
        finally:
            cache.source.load = original
        opened = len(set(seen))
    return best, opened


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        synthetic_cache(Path(directory), 4096, args.top_k, args.shards * args.per_shard,
                        args.length)  # fmt: skip
        # synthetic_cache cuts shards at 8 x length tokens: re-read the real shard count
        cache = open_cache(directory)
        shards = len(cache.shards("train"))
        window, window_shards = resume_cost(cache, WINDOW_ORDER, args.batch, args.reps)
        buffer, buffer_shards = resume_cost(cache, BUFFER_ORDER, args.batch, args.reps)
    print(
        f"resume at 90% of a {shards}-shard epoch, time to the first batch (best of {args.reps}):"
    )
    print(f"  window order (arithmetic)  {window * 1e3:8.1f} ms, {window_shards:3d} shards opened")
    print(f"  buffer order (re-read)     {buffer * 1e3:8.1f} ms, {buffer_shards:3d} shards opened")
    print(f"  ratio buffer / window      {buffer / window:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
