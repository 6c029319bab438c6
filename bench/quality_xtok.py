"""Cross-tokenizer study: the demo teacher's cache, a student with another tokenizer (8,192).

Same body, seed, steps and data (the demo cache's train split) for every student:

* same tokenizer (the teacher's 16,384-token BPE): CE only, and AKL + 0.5 CE (the demo's KD);
* the cross student: a byte-level Unigram tokenizer with 8,192 tokens trained on the same
  teacher-train files (``--student-tokenizer bpe``: a BPE trained like the teacher's, whose
  tokens are all teacher tokens). CE only; cross-tokenizer KD with the defaults (``--vocab-map
  exact --distill-inside``) without ULD (``exact+inside``) and with it (``exact+inside+uld``,
  ``--uld-weight 1``, the default); the same with ``--vocab-map prefix`` (``prefix+inside*``);
  the prefix map alone (``prefix-only``); and the behaviour before the inside positions
  (``old-*``: ``--vocab-map exact --no-distill-inside``). AKL + 0.5 CE like the same-tokenizer
  KD student. Every flag is passed explicitly, so the runs do not depend on the defaults.

Every student is trained with ``kdcache train`` (the real CLI) and scored on the cache's holdout
split in bits per byte on its own tokenization (``bits_per_byte``). Resumable: finished runs are
skipped. Results go to ``<out>/results-<worker>.json``; ``--table`` prints the markdown tables
of all of them (bits per byte, then the KD gains against the same-tokenizer gain).

    python bench/quality_xtok.py --out bench/out/xtok --steps 60 --seeds 0 1 2
    python bench/quality_xtok.py --out bench/out/xtok --table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# The cross-tokenizer student: a Unigram tokenizer (8,192 tokens) on the teacher-train files, so
# its vocabulary is not a subset of the teacher's BPE (``--student-tokenizer bpe``: the BPE
# trained like the teacher's, whose 8,192 tokens are all teacher tokens: ULD then ranks nothing).
# The ``old-*`` students: the behaviour before the inside positions (exact matches only,
# boundary positions only).
_KD = ["--loss", "akl", "--ce-weight", "0.5", "--cross-tokenizer"]
_OLD = ["--vocab-map", "exact", "--no-distill-inside"]
_INSIDE = ["--distill-inside"]
CONFIGS: dict[str, dict] = {
    "same/ce": {"student": "same", "flags": ["--loss", "ce"]},
    "same/akl": {"student": "same", "flags": ["--loss", "akl", "--ce-weight", "0.5"]},
    "xtok/ce": {"student": "xtok", "flags": ["--loss", "ce", "--cross-tokenizer"]},
    "xtok/exact+inside": {"student": "xtok",
                          "flags": [*_KD, "--uld-weight", "0", "--vocab-map", "exact", *_INSIDE]},
    "xtok/exact+inside+uld": {"student": "xtok",
                              "flags": [*_KD, "--uld-weight", "1", "--vocab-map", "exact", *_INSIDE]},
    "xtok/prefix+inside": {"student": "xtok",
                           "flags": [*_KD, "--uld-weight", "0", "--vocab-map", "prefix", *_INSIDE]},
    "xtok/prefix+inside+uld": {"student": "xtok",
                               "flags": [*_KD, "--uld-weight", "1", "--vocab-map", "prefix", *_INSIDE]},
    "xtok/prefix-only": {"student": "xtok",
                         "flags": [*_KD, "--uld-weight", "0", "--vocab-map", "prefix",
                                   "--no-distill-inside"]},
    "xtok/old-exact": {"student": "xtok", "flags": [*_KD, "--uld-weight", "0", *_OLD]},
    "xtok/old-exact+uld": {"student": "xtok", "flags": [*_KD, "--uld-weight", "1", *_OLD]},
}  # fmt: skip


def _kdcache() -> list[str]:
    return [sys.executable, "-c", "from kdcache.cli.app import main; main()"]


def train_unigram_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level Unigram ``PreTrainedTokenizerFast`` on ``texts`` (the demo's specials).

    The teacher's pre-tokenizer (GPT-2 byte-level split) and decoder, a Unigram model instead
    of BPE: its pieces are chosen by likelihood, not by merges, so its vocabulary is *not* a
    subset of the teacher's BPE vocabulary (the ULD term then has tokens to rank).
    """
    from kdcache.demo.train_teacher import train_tokenizer

    return train_tokenizer(texts, vocab_size, kind="unigram")


def prepare(out: Path, vocab_size: int, kind: str = "unigram") -> tuple[Path, Path, Path]:
    """(cache dir, same-tokenizer student config, cross-tokenizer student dir).

    ``kind``: the cross student's tokenizer, ``unigram`` (not a subset of the teacher's
    vocabulary) or ``bpe`` (trained like the teacher's: a subset).
    """
    from kdcache.demo import corpus, demo_student_config_path
    from kdcache.demo.train_teacher import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    cache = out / "kdcache-demo" / "cache"
    if not (cache / "manifest.json").is_file():
        subprocess.run([*_kdcache(), "build"], cwd=out, check=True)
    student_dir = out / f"student-{kind}-{vocab_size}"
    if not (student_dir / "config.json").is_file():
        trainer = train_unigram_tokenizer if kind == "unigram" else train_tokenizer
        tokenizer = trainer(corpus.iter_texts("teacher-train"), vocab_size)
        tokenizer.save_pretrained(student_dir)
        config = json.loads(demo_student_config_path().read_text())
        config["vocab_size"] = len(tokenizer)
        (student_dir / "config.json").write_text(json.dumps(config, indent=2))
    return cache, demo_student_config_path(), student_dir


def train(cache: Path, student: Path, run: Path, flags: list[str], seed: int, steps: int) -> float:
    """Train one student with ``kdcache train``; returns the wall time in seconds."""
    started = time.perf_counter()
    args = [*_kdcache(), "train", "--cache", str(cache), "--student", str(student), "--out",
            str(run), "--steps", str(steps), "--batch-size", "8", "--lr", "3e-3",
            "--warmup-steps", "10", "--seed", str(seed), "--no-progress", "--overwrite", *flags]  # fmt: skip
    subprocess.run(args, check=True)
    return time.perf_counter() - started


def score(cache: Path, run: Path, same_tokenizer: bool) -> dict:
    """Held-out bits per byte (and CE on its own tokens) of ``run/final``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.cache import open_cache
    from kdcache.trainer.cross_tokenizer.alignment import CrossTokenizer
    from kdcache.trainer.cross_tokenizer.bits_per_byte import bits_per_byte, student_sequences

    teacher_tokenizer = AutoTokenizer.from_pretrained(cache / "tokenizer")
    student_tokenizer = AutoTokenizer.from_pretrained(run / "final")
    cross = CrossTokenizer(teacher_tokenizer, student_tokenizer, "exact", distill_inside=False)
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    records = open_cache(cache).sequences("holdout")
    result = bits_per_byte(model, student_sequences(records, cross, same_tokenizer))
    train_lines = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    last = [line for line in train_lines if line["kind"] == "train"][-1]
    for key in ("aligned_fraction", "matched_mass", "inside_fraction", "inside_ce_only_fraction"):
        if key in last:
            result[key] = last[key]
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table(results: dict) -> str:
    """Markdown: bits per byte per config and seed with the alignment counts, then the KD gains
    (CE-only minus KD, same seed) and their share of the same-tokenizer gain."""
    seeds = sorted({int(key.split("@")[1]) for key in results})
    lines = ["| student | " + " | ".join(f"bpb seed {s}" for s in seeds)
             + " | mean bpb | aligned | inside distilled | inside CE only | exact-match mass |",
             "|---" * (len(seeds) + 6) + "|"]  # fmt: skip
    for name in CONFIGS:
        runs = [results.get(f"{name}@{seed}") for seed in seeds]
        done = [run for run in runs if run]
        if not done:
            continue
        cells = [f"{run['bpb']:.4f}" if run else "missing" for run in runs]
        mean_bpb = sum(run["bpb"] for run in done) / len(done)
        stats = [_pct(done[0].get(key)) for key in ("aligned_fraction", "inside_fraction",
                 "inside_ce_only_fraction", "matched_mass")]  # fmt: skip
        if name.startswith("same/"):
            stats = ["-"] * 4
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_bpb:.4f} | "
                     + " | ".join(stats) + " |")  # fmt: skip
    lines += ["", "| KD gain (bpb) | " + " | ".join(f"seed {s}" for s in seeds)
              + " | mean | share of same-tokenizer gain (mean) |",
              "|---" * (len(seeds) + 3) + "|"]  # fmt: skip
    same_gain = _gains(results, "same/ce", "same/akl", seeds)
    for base, name in [("same/ce", "same/akl")] + [
        ("xtok/ce", name) for name in CONFIGS if name.startswith("xtok/") and name != "xtok/ce"
    ]:
        gains = _gains(results, base, name, seeds)
        done = [(seed, gain) for seed, gain in gains.items() if gain is not None]
        if not done:
            continue
        cells = [f"{gains[s]:+.4f}" if gains[s] is not None else "missing" for s in seeds]
        mean = sum(gain for _, gain in done) / len(done)
        pairs = [same_gain[s] for s, _ in done if same_gain[s] is not None]
        share = mean / (sum(pairs) / len(pairs)) if pairs and len(pairs) == len(done) else None
        lines.append(f"| {name} - {base} | " + " | ".join(cells) + f" | {mean:+.4f} | "
                     + ("-" if share is None else f"{share:.0%}") + " |")  # fmt: skip
    return "\n".join(lines)


def _gains(results: dict, base: str, name: str, seeds: list[int]) -> dict[int, float | None]:
    """Per seed: bpb of ``base`` minus bpb of ``name`` (positive: ``name`` is better)."""
    out: dict[int, float | None] = {}
    for seed in seeds:
        a, b = results.get(f"{base}@{seed}"), results.get(f"{name}@{seed}")
        out[seed] = None if a is None or b is None else a["bpb"] - b["bpb"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/xtok"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--student-tokenizer", choices=["unigram", "bpe"], default="unigram")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--runs", nargs="+", help="only these NAME@SEED runs (else all)")
    parser.add_argument("--worker", default="all", help="results-<worker>.json (parallel runs)")
    parser.add_argument("--table", action="store_true", help="print the table of all results")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.table:
        merged = {}
        for path in sorted(out.glob("results-*.json")):
            merged.update(json.loads(path.read_text()))
        print(table(merged))
        return 0
    cache, same_student, cross_student = prepare(out, args.vocab_size, args.student_tokenizer)
    results_path = out / f"results-{args.worker}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    keys = args.runs or [f"{name}@{seed}" for seed in args.seeds for name in args.configs]
    for key in keys:
        if key in results:
            continue
        name, seed = key.split("@")[0], int(key.split("@")[1])
        spec = CONFIGS[name]
        student = same_student if spec["student"] == "same" else cross_student
        run = out / "runs" / name.replace("/", "-") / f"seed{seed}"
        finished = (run / "final" / "config.json").is_file()  # trained earlier: score only
        seconds = 0.0 if finished else train(cache, student, run, spec["flags"], seed, args.steps)
        results[key] = {**score(cache, run, spec["student"] == "same"), "train_s": seconds}
        results_path.write_text(json.dumps(results, indent=2))
        print(f"{key}: bpb {results[key]['bpb']:.4f} ({seconds:.0f}s)", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
