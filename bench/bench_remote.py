"""Reading a cache from S3 (a local moto server) vs local disk, measured side by side in one run.

    python bench/bench_remote.py                       # vocab 32k, k 64, 192 sequences x 512
    python bench/bench_remote.py --sequences 96 --steps 12

Writes a synthetic cache (bench_loader.synthetic_cache), pushes it to a moto S3 server started on
127.0.0.1 (tests/s3_server.py, a real HTTP S3 API), then in one process:

* loader: positions/s of ``CacheDataset.epoch_batches()`` over one epoch from local disk, and from
  s3 through a cold read-through cache (every shard downloaded and sha256-checked) with prefetch
  2 (the default) and 0, and with the read-through cache warm;
* steps: wall time per training step of a tiny Llama student (2 layers, hidden 64, chunked AKL)
  fed by the loader, from local disk and from s3 (cold cache, prefetch 2).

Ratios are printed next to each other; absolute numbers drift on a busy machine. Steps/s one
prefetching reader can feed = remote loader positions/s / positions per step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3_server

from bench_loader import loader_rate, synthetic_cache

from kdcache.cache import open_cache
from kdcache.cache.transfer import push_cache
from kdcache.trainer.data import CacheDataset
from kdcache.trainer.objective import DistillObjective, batch_loss


def step_seconds(cache, vocab: int, batch_size: int, steps: int) -> float:
    """Mean wall seconds per training step, the loader included (first step excluded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    objective = DistillObjective(
        model, kind="akl", mu=0.5, temperature=1.0, alpha=0.0, chunk_size=1024, chunked=True
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = CacheDataset(cache, batch_size=batch_size).epoch_batches()
    started = None
    for index, batch in enumerate(batches):
        if index == 1:
            started = time.perf_counter()
        if index > steps:
            break
        count = float(batch["distill_mask"].sum())
        batch_loss(objective, batch, count, count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def main() -> None:
    from tests.s3_server import start_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=192)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = open_cache(
            synthetic_cache(root / "local", args.vocab, args.top_k, args.sequences, args.length)
        )
        server = start_server(root / "moto.log")
        try:
            bucket = server.new_bucket()
            url = f"s3://{bucket}/cache"
            started = time.perf_counter()
            push_cache(local.path, url, storage_options=server.options)
            push_s = time.perf_counter() - started
            size = local.manifest["bytes"]
            print(
                f"cache: {args.sequences} x {args.length} positions, k={args.top_k}, vocab "
                f"{args.vocab}, {len(local.shards('train'))} shards, {size / 1e6:.1f} MB; "
                f"push {size / push_s / 1e6:.1f} MB/s (incl. read-back check)"
            )

            def remote(name: str, prefetch: int):
                return open_cache(
                    url, storage_options=server.options, cache_dir=root / name, prefetch=prefetch
                )

            local_rate, _ = loader_rate(local, 0, args.batch_size, 1)
            rows = [("local disk", local_rate)]
            rows.append(
                ("s3 cold, prefetch 2", loader_rate(remote("p2", 2), 0, args.batch_size, 1)[0])
            )
            rows.append(
                ("s3 cold, prefetch 0", loader_rate(remote("p0", 0), 0, args.batch_size, 1)[0])
            )
            rows.append(
                ("s3 warm read-through", loader_rate(remote("p2", 2), 0, args.batch_size, 1)[0])
            )
            for name, rate in rows:
                print(
                    f"loader {name:<22} {rate:12,.0f} positions/s   vs local {rate / local_rate:5.2f}"
                )
            step_local = step_seconds(local, args.vocab, args.batch_size, args.steps)
            step_remote = step_seconds(remote("steps", 2), args.vocab, args.batch_size, args.steps)
            per_step = args.batch_size * args.length
            print(
                f"step (tiny student, chunked AKL): local {step_local * 1e3:7.1f} ms, s3 "
                f"{step_remote * 1e3:7.1f} ms   s3/local = {step_remote / step_local:5.2f}"
            )
            print(
                f"one prefetching s3 reader feeds {rows[1][1] / per_step:6.1f} steps/s of "
                f"{per_step} positions (the tiny student takes {1 / step_local:5.1f} steps/s)"
            )
        finally:
            server.process.terminate()
            server.process.wait(timeout=30)


if __name__ == "__main__":
    main()
