"""Small-cache encodings (issue 25) side by side on a real cache: bytes per column group, the
same records at a 152k vocabulary, read speed against what a student consumes.

    python bench/bench_small.py --cache bench/out/small/caches/sharp-q8-k8-s8

The records of ``--cache`` (any kdcache cache with tail samples, e.g. one the frontier study
built) are re-encoded by the real ``ShardWriter`` in each encoding (``exact``, ``unique``,
``q8``) and read back through ``open_cache`` (sha256 verified, the DataLoader's path):

* bytes/token per column group (Arrow column bytes, zstd-compressed, over the cache's tokens);
* the same at a 152k vocabulary: every id x ``--spread`` (9: 16,384 ids spread over 147k, the
  ids' deltas 9x wider, as a 152k tokenizer's would be) in a ``vocab_size`` 152,064 shard (3 id
  byte planes): a measurement of what the wider ids cost, not of a real 152k teacher;
* read positions/s (one core) against the positions/s of one training step on those records
  (``bench_step.make_step``: forward + backward of the bench student, vocab of the cache, the
  fused chunked head), the ratio being what the loader has to spare.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import build_model, make_step

from kdcache.cache import ShardWriter, open_cache, shard_summary, write_manifest
from kdcache.cache.records import SequenceRecord

ENCODINGS = ("exact", "unique", "q8")


def write(records, directory: Path, mode: str, top_k: int, vocab: int, samples: int) -> Path:
    with ShardWriter(directory, "train", top_k=top_k, vocab_size=vocab, mode=mode,
                     tail_samples=samples) as writer:  # fmt: skip
        for record in records:
            writer.write(record)
    manifest = {"teacher": "bench", "vocab_size": vocab, "top_k": top_k, "temperature": 1.0,
                "tokenizer_fingerprint": "bench", "mode": mode, "tail_samples": samples,
                "num_sequences": len(records),
                "num_tokens": sum(r.num_tokens for r in records),
                **shard_summary(writer.close())}  # fmt: skip
    write_manifest(directory, manifest)
    return directory


def column_bytes(directory: Path, tokens: int) -> dict[str, float]:
    """Bytes/token per Arrow column of every shard of ``directory``."""
    total: collections.Counter = collections.Counter()
    for path in sorted((directory / "shards").glob("*.arrow")):
        reader = pa.ipc.open_file(path)
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index)
            for name in batch.schema.names:
                total[name] += batch.column(name).nbytes
    return {name: count / tokens for name, count in total.items()}


def spread(record: SequenceRecord, factor: int) -> SequenceRecord:
    """``record`` with every id multiplied by ``factor`` (same order, wider deltas)."""
    values = dict(record.__dict__)
    for name in ("input_ids", "topk_ids", "tail_ids"):
        if values[name] is not None:
            values[name] = (values[name].astype(np.int64) * factor).astype(np.int32)
    return SequenceRecord(**values)


def read_rate(directory: Path) -> float:
    cache = open_cache(directory)
    started = time.perf_counter()
    count = sum(r.num_positions for r in cache.sequences("train", verify=True))
    return count / (time.perf_counter() - started)


def step_rate(variant: str, vocab: int, batch: int, seq: int, reps: int) -> float:
    """Positions/s of the bench student's training step (min over ``reps`` after a warm-up)."""
    model = build_model(vocab, seq)
    step = make_step(variant, model, vocab, batch, seq, 256)
    step()
    best = min(_timed(step) for _ in range(reps))
    return batch * seq / best


def _timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-sequences", type=int, default=200)
    parser.add_argument("--spread", type=int, default=9)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--step-variant", default="q8-k8-s8", help="bench_step variant to time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = open_cache(args.cache)
    top_k, vocab = int(cache.manifest["top_k"]), int(cache.manifest["vocab_size"])
    samples = int(cache.manifest.get("tail_samples") or 0)
    records = []
    for record in cache.sequences(args.split):
        records.append(record)
        if len(records) >= args.max_sequences:
            break
    tokens = sum(r.num_tokens for r in records)
    print(f"{args.cache}: top-{top_k} + {samples} samples, vocab {vocab}, {len(records)} "
          f"sequences, {tokens} tokens (one core)")  # fmt: skip
    wide = [spread(r, args.spread) for r in records]
    rates = {}
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-small-") as work:
        for mode in ENCODINGS:
            here = write(records, Path(work) / mode, mode, top_k, vocab, samples)
            columns = column_bytes(here, tokens)
            read_rate(here)  # warm-up: lazy imports, page cache
            rates[mode] = read_rate(here)
            at_152k = write(wide, Path(work) / f"{mode}-152k", mode, top_k, 152064, samples)
            wide_total = sum(column_bytes(at_152k, tokens).values())
            print(f"\n{mode}: {sum(columns.values()):.1f} B/token at vocab {vocab}, "
                  f"{wide_total:.1f} at 152k (ids x {args.spread}); read "
                  f"{rates[mode]:,.0f} positions/s")  # fmt: skip
            print("  " + ", ".join(f"{name} {value:.2f}" for name, value in columns.items()
                                   if value >= 0.05))  # fmt: skip
            shutil.rmtree(here)
    consumed = step_rate(args.step_variant, vocab, 4, 256, args.reps)
    print(f"\ntraining step ({args.step_variant}, bench student, vocab {vocab}, 4 x 256): "
          f"{consumed:,.0f} positions/s")  # fmt: skip
    for mode, rate in rates.items():
        print(f"  read {mode}: {rate / consumed:.0f}x what the step consumes")


if __name__ == "__main__":
    main()
