"""Cross-tokenizer batch preparation time: exact map vs prefix map vs prefix + inside positions.

    python bench/bench_prep_xtok.py --out bench/out/xtok     # the study's cache and student

Times ``student_record`` + ``collate_student_records`` (what a DataLoader worker does per
batch) over the first ``--batches`` batches of 8 cached train sequences, for three settings, in
one process, interleaved over ``--reps`` repetitions. ``cold``: a fresh ``CrossTokenizer`` (its
first-student-token memo empty, the prefix map built in the constructor and timed apart);
``warm``: the same batches again. Prints ms per batch (median over repetitions).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

SETTINGS = {
    "exact": ("exact", False),
    "prefix": ("prefix", False),
    "prefix+inside": ("prefix", True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/xtok"))
    parser.add_argument("--student", default="student-unigram-8192")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from kdcache.cache import open_cache
    from kdcache.trainer.cross_tokenizer.alignment import CrossTokenizer
    from kdcache.trainer.cross_tokenizer.batches import collate_student_records, student_record

    torch.set_num_threads(1)
    cache_dir = args.out / "kdcache-demo" / "cache"
    teacher = AutoTokenizer.from_pretrained(cache_dir / "tokenizer")
    student = AutoTokenizer.from_pretrained(args.out / args.student)
    records = list(itertools.islice(open_cache(cache_dir).sequences(), 8 * args.batches))
    groups = [records[i : i + 8] for i in range(0, len(records), 8)]
    timings: dict[str, dict[str, list[float]]] = {
        name: {"setup_s": [], "cold_ms": [], "warm_ms": []} for name in SETTINGS
    }
    for _ in range(args.reps):
        for name, (vocab_map, inside) in SETTINGS.items():
            started = time.perf_counter()
            cross = CrossTokenizer(teacher, student, vocab_map, inside)
            timings[name]["setup_s"].append(time.perf_counter() - started)
            for phase in ("cold_ms", "warm_ms"):
                started = time.perf_counter()
                for group in groups:
                    collate_student_records([student_record(r, cross) for r in group])
                elapsed = (time.perf_counter() - started) * 1000 / len(groups)
                timings[name][phase].append(elapsed)
    summary = {
        name: {key: statistics.median(values) for key, values in parts.items()}
        for name, parts in timings.items()
    }
    print(json.dumps(summary, indent=2))
    base = summary["exact"]["warm_ms"]
    for name, row in summary.items():
        print(f"{name:14s} setup {row['setup_s']:.2f}s  cold {row['cold_ms']:.1f} ms/batch  "
              f"warm {row['warm_ms']:.1f} ms/batch  ({row['warm_ms'] / base:.2f}x exact)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
