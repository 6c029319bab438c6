"""Loader throughput (0, 1, 2 workers) vs what a training step consumes, side by side.

    python bench/bench_loader.py                      # vocab 32k, k 64, 192 sequences x 512
    python bench/bench_loader.py --vocab 128000 --sequences 64

Writes a synthetic cache (exact mode, ShardWriter) into a temp dir, then measures in one process:

* loader: positions/s of ``CacheDataset.epoch_batches()`` (decode + shuffle + collate) over one
  epoch, for 0, 1 and 2 DataLoader workers (best of --reps epochs);
* trainer: positions/s of full training steps (forward, chunked AKL, backward, AdamW) of a tiny
  Llama student (2 layers, hidden 64) on batches already in memory, so the loader is excluded.

The ratio loader / trainer must stay above 1: the loader is never the bottleneck. On a GPU the
trainer is much faster; there the worker count that keeps the ratio above 1 is what matters.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.cache import SequenceRecord, ShardWriter, open_cache, shard_summary, write_manifest
from kdcache.trainer.data import CacheDataset
from kdcache.trainer.objective import DistillObjective, batch_loss
from kdcache.trainer.targets import LossOptions, target_for_cache


def synthetic_cache(directory: Path, vocab: int, top_k: int, sequences: int, length: int) -> Path:
    """Records with distinct random ids per row and Dirichlet-distributed descending probs."""
    rng = np.random.default_rng(0)
    with ShardWriter(
        directory, "train", top_k=top_k, vocab_size=vocab, max_shard_tokens=8 * length
    ) as writer:
        for index in range(sequences):
            base = rng.integers(0, vocab, (length, 1))
            stride = rng.integers(1, 97, (length, 1))
            ids = (base + stride * np.arange(top_k)[None, :]) % vocab  # distinct per row
            probs = rng.dirichlet(np.full(top_k + 1, 0.1), size=length)
            head = -np.sort(-probs[:, :top_k], axis=1)
            writer.write(
                SequenceRecord(
                    sequence_id=index,
                    input_ids=rng.integers(0, vocab, length).astype(np.int32),
                    topk_ids=ids.astype(np.int32),
                    topk_logprobs=np.log(np.maximum(head, 1e-30)).astype(np.float32),
                    tail_mass=probs[:, top_k].astype(np.float32),
                    positions=np.arange(length, dtype=np.int32),
                )
            )
    manifest = shard_summary(writer.close())
    manifest.update(
        teacher="synthetic",
        vocab_size=vocab,
        top_k=top_k,
        temperature=1.0,
        tokenizer_fingerprint="synthetic",
    )
    write_manifest(directory, manifest)
    return directory


def loader_rate(cache, workers: int, batch_size: int, reps: int) -> tuple[float, float]:
    """(positions/s over a whole epoch incl. worker start-up, after the first batch arrived)."""
    best_total = best_steady = 0.0
    for rep in range(reps):
        dataset = CacheDataset(cache, batch_size=batch_size, num_workers=workers, seed=rep)
        positions, first, start = 0, 0, time.perf_counter()
        first_at = start
        for batch in dataset.epoch_batches():
            count = int(batch["distill_mask"].sum())
            if first == 0:
                first, first_at = count, time.perf_counter()
            positions += count
        end = time.perf_counter()
        best_total = max(best_total, positions / (end - start))
        best_steady = max(best_steady, (positions - first) / max(end - first_at, 1e-9))
    return best_total, best_steady


def trainer_rate(cache, vocab: int, batch_size: int, steps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config)
    objective = DistillObjective(
        model, target_for_cache(cache.manifest), LossOptions(kind="akl"), alpha=0.0,
        chunk_size=1024, chunked=True,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = list(CacheDataset(cache, batch_size=batch_size).epoch_batches())[: steps + 1]
    positions, elapsed = 0, 0.0
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        count = float(batch["distill_mask"].sum())
        loss = batch_loss(objective, batch, count, count)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index > 0:  # the first step warms up
            elapsed += time.perf_counter() - start
            positions += int(count)
    return positions / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=192)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cache = open_cache(
            synthetic_cache(Path(tmp), args.vocab, args.top_k, args.sequences, args.length)
        )
        print(
            f"cache: {args.sequences} x {args.length} positions, k={args.top_k}, "
            f"vocab {args.vocab}, {len(cache.shards('train'))} shards, "
            f"{cache.manifest['bytes'] / (args.sequences * args.length):.0f} B/position"
        )
        trainer = trainer_rate(cache, args.vocab, args.batch_size, args.steps)
        print(f"trainer (tiny student, chunked AKL, CPU):  {trainer:10,.0f} positions/s")
        for workers in (0, 1, 2):
            total, steady = loader_rate(cache, workers, args.batch_size, args.reps)
            print(
                f"loader  workers={workers}: epoch {total:10,.0f} positions/s "
                f"(steady {steady:10,.0f})   loader/trainer = {total / trainer:7.1f}x"
            )


if __name__ == "__main__":
    main()
