"""Where a ``build_cache`` run spends its wall time, stage by stage (timers, not sampling).

    python bench/profile_build.py --teacher DIR --data FILE.jsonl [--top-k 64] [--threads 1]

Runs the exact library call ``kdcache build`` makes (``build_cache(BuildConfig(...))``) with
timers wrapped around its stages (this script patches them in; the library is unchanged):

* main thread: setup (tokenizer, data, model, fingerprints, directory), waiting for the next
  tokenized window (the prefetch thread), batch assembly + host copies (``TeacherRunner.run``
  outside the two stages below), the body forward, the chunked head + log-softmax + top-k (+ tail
  samples), handing records to the writer (``ShardWriter.write``: checks + bounded queue), tqdm,
  closing the writers, the manifest;
* background threads (their own wall time, overlapped with the main thread): tokenization +
  packing (prefetch), block encoding, and shard finishing (fsync, checksum, rename, journal).

Prints each stage's seconds and share of the main thread's wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

TIMES: dict[str, float] = defaultdict(float)


def _timed(name: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - start

    return wrapper


def _timed_iterator(name: str, function):
    """Time spent producing each item of the generator ``function(...)`` returns."""

    def wrapper(*args, **kwargs):
        iterator = iter(function(*args, **kwargs))
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                TIMES[name] += time.perf_counter() - start
                return
            TIMES[name] += time.perf_counter() - start
            yield item

    return wrapper


def instrument() -> None:
    """Wrap the build's stages with timers (module attributes, looked up at call time)."""
    from kdcache.cache.build import pipeline as build
    from kdcache.cache.build import teacher
    from kdcache.cache.extraction import tail_sampling
    from kdcache.cache.extraction.heads import body_of
    from kdcache.cache.format import shards

    teacher.TeacherRunner.run = _timed("teacher: run() total", teacher.TeacherRunner.run)
    teacher.topk_from_hidden = _timed("teacher: head + top-k", teacher.topk_from_hidden)
    teacher.topk_from_logit_rows = _timed("teacher: head + top-k", teacher.topk_from_logit_rows)
    tail_sampling.topk_and_tail_samples = _timed(
        "teacher: head + top-k + tail samples", tail_sampling.topk_and_tail_samples
    )

    def timed_body(model):
        body = body_of(model)
        return _timed("teacher: body forward", body)

    teacher.body_of = timed_body
    teacher.windows = _timed_iterator("prefetch thread: tokenize + pack", teacher.windows)
    original_prefetch = teacher.prefetch
    teacher.prefetch = lambda iterable, size=2: _timed_iterator(
        "main: wait for tokenized data", original_prefetch
    )(iterable, size)
    shards.ShardWriter.write = _timed(
        "main: writer.write (checks + queue)", shards.ShardWriter.write
    )
    shards.ShardWriter.close = _timed("main: writer close (drain)", shards.ShardWriter.close)
    shards._OpenShard.write_block = _timed(
        "writer thread: encode + append block", shards._OpenShard.write_block
    )
    shards._OpenShard.finish = _timed(
        "writer thread: finish shard (fsync, sha256, rename)", shards._OpenShard.finish
    )
    build._run_split = _timed("main: teacher + writing loop", build._run_split)
    build._write_manifest = _timed("main: manifest", build._write_manifest)
    original_bar = build._progress_bar

    @contextlib.contextmanager
    def timed_bar(enabled: bool):
        with original_bar(enabled) as bar:
            bar.update = _timed("main: tqdm", bar.update)
            bar.set_postfix = _timed("main: tqdm", bar.set_postfix)
            yield bar

    build._progress_bar = timed_bar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--tail-samples", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true", help="show tqdm (as the CLI does)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    instrument()
    import shutil
    import tempfile

    from kdcache.cache.build.pipeline import BuildConfig, build_cache

    out = args.out or Path(tempfile.mkdtemp(prefix="kdcache-profile-")) / "cache"
    shutil.rmtree(out, ignore_errors=True)
    config = BuildConfig(
        teacher=args.teacher, data=args.data, out=out, top_k=args.top_k,
        tail_samples=args.tail_samples, max_length=args.max_length, holdout=0.0,
        batch_tokens=args.batch_tokens, progress=args.progress,
    )  # fmt: skip
    start = time.perf_counter()
    summary = build_cache(config)
    total = time.perf_counter() - start
    loop = TIMES["main: teacher + writing loop"]
    run = TIMES.pop("teacher: run() total")
    inner = sum(v for k, v in TIMES.items() if k.startswith("teacher: "))
    TIMES["teacher: batch assembly + host copies"] = run - inner
    TIMES["main: setup (load, fingerprints) + rest"] = total - loop - TIMES["main: manifest"]
    main_loop_parts = [k for k in TIMES if k.startswith(("teacher:", "main: w", "main: tqdm"))]
    TIMES["main: loop, other"] = loop - sum(TIMES[k] for k in main_loop_parts)
    print(f"{summary.line()}\nwall {total:.2f} s, loop {loop:.2f} s; {args.threads} thread(s)")
    for name in sorted(TIMES, key=lambda k: (k.split(":")[0] != "main", k)):
        share = TIMES[name] / total
        print(f"  {name:<55} {TIMES[name]:8.2f} s  {100 * share:5.1f}% of wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
