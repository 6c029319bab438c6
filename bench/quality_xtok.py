"""Cross-tokenizer study: the demo teacher's cache, students with other tokenizers (8,192).

Same body, seed, steps and data (the demo cache's train split) for every student:

* the same-tokenizer reference (the teacher's 16,384-token BPE): CE only (``same/ce``) and pure
  KD (``same/fkl``: ``--loss fkl --ce-weight 0``);
* each cross student (``--student-tokenizer``): ``unigram``, a byte-level Unigram with 8,192
  tokens trained on the teacher-train files (its vocabulary is not a subset of the teacher's
  BPE), or ``bpe-other``, a byte-level BPE with 8,192 tokens trained on *other* text (the Python
  docs of ``pydoc_data`` and third-party sources from site-packages, neither seen by the
  teacher's tokenizer). Per student: CE only (``ce``); the chunk-likelihood objective pure
  (``alm``: ``--xtok-loss alm --ce-weight 0``), with the exact-match term (``alm+exact``) and with
  0.5 CE (``alm+ce``); the exact-match target alone (``exact``: ``--xtok-loss exact``, the
  objective before issue 26) pure and with 0.5 CE. Every flag is passed explicitly, so the runs do
  not depend on the defaults, except ``flag-only``: ``--cross-tokenizer`` and nothing else, what
  a user who only adds the flag gets from the kdcache that runs it (``--loss akl``, ULD on).

Every student is trained with ``kdcache train`` (the real CLI) and scored on the cache's holdout
split in bits per byte on its own tokenization (``bits_per_byte``). Resumable: finished runs are
skipped. Results go to ``<out>/results-<worker>.json``, keyed ``<student>/<config>@<seed>``;
``--table`` prints the markdown tables of all of them (bits per byte, then the KD gains against
CE only, and their share of the same-tokenizer pure-KD gain).

    python bench/quality_xtok.py --out bench/out/xtok --steps 150 --seeds 0 1 2 \
        --student-tokenizer unigram --configs ce alm
    python bench/quality_xtok.py --out bench/out/xtok --table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

_XTOK = ["--cross-tokenizer", "--vocab-map", "exact", "--distill-inside", "--uld-weight", "0"]
SAME_CONFIGS: dict[str, list[str]] = {
    "ce": ["--loss", "ce"],
    "fkl": ["--loss", "fkl", "--ce-weight", "0"],
}
XTOK_CONFIGS: dict[str, list[str]] = {
    "ce": ["--loss", "ce", "--cross-tokenizer"],
    "alm": [*_XTOK, "--xtok-loss", "alm", "--loss", "fkl", "--ce-weight", "0"],
    "alm+exact": [*_XTOK, "--xtok-loss", "alm+exact", "--loss", "fkl", "--ce-weight", "0"],
    "alm+ce": [*_XTOK, "--xtok-loss", "alm", "--loss", "fkl", "--ce-weight", "0.5"],
    "alm+exact+ce": [*_XTOK, "--xtok-loss", "alm+exact", "--loss", "fkl", "--ce-weight", "0.5"],
    "exact": [*_XTOK, "--xtok-loss", "exact", "--loss", "fkl", "--ce-weight", "0"],
    "exact+ce": [*_XTOK, "--xtok-loss", "exact", "--loss", "fkl", "--ce-weight", "0.5"],
    "alm+exact+prefix": [
        *["--cross-tokenizer", "--vocab-map", "prefix", "--distill-inside", "--uld-weight", "0"],
        *["--xtok-loss", "alm+exact", "--loss", "fkl", "--ce-weight", "0"],
    ],
    # the same with --loss akl and ULD on (the trainer's defaults for these two)
    "alm+exact+prefix-akl-uld": [
        *["--cross-tokenizer", "--vocab-map", "prefix", "--distill-inside", "--uld-weight", "1"],
        *["--xtok-loss", "alm+exact", "--loss", "akl", "--ce-weight", "0"],
    ],
    # what a user who only adds the flag gets: kdcache train's defaults of the kdcache installed
    "flag-only": ["--cross-tokenizer"],
}
STUDENTS = ("unigram", "bpe-other")
# third-party sources for the bpe-other tokenizer, in this order, up to OTHER_TEXT_CHARS
OTHER_PACKAGES = ("click", "yaml", "dateutil", "fsspec", "attr", "jinja2", "requests", "urllib3")
OTHER_TEXT_CHARS = 4_000_000


def other_texts() -> list[str]:
    """Text the teacher's tokenizer never saw: the Python docs (``pydoc_data/topics.py``, English
    prose with code) and the sources of a few third-party packages, at most OTHER_TEXT_CHARS."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / "pydoc_data" / "topics.py"]
    purelib = Path(sysconfig.get_paths()["purelib"])
    for package in OTHER_PACKAGES:
        files += sorted((purelib / package).rglob("*.py"))
    texts, total = [], 0
    for path in files:
        if total >= OTHER_TEXT_CHARS or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts += [text[i : i + 4000] for i in range(0, len(text), 4000)]
        total += len(text)
    return texts


def _kdcache() -> list[str]:
    return [sys.executable, "-c", "from kdcache.cli.app import main; main()"]


def prepare(out: Path, vocab_size: int, kind: str) -> tuple[Path, Path, Path]:
    """(cache dir, same-tokenizer student config, cross-tokenizer student dir) for ``kind``
    (``unigram`` or ``bpe-other``, see the module docstring)."""
    from kdcache.demo import corpus, demo_student_config_path
    from kdcache.demo.train_teacher import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    cache = out / "kdcache-demo" / "cache"
    if not (cache / "manifest.json").is_file():
        subprocess.run([*_kdcache(), "build"], cwd=out, check=True)
    student_dir = out / f"student-{kind}-{vocab_size}"
    if not (student_dir / "config.json").is_file():
        if kind == "unigram":
            tokenizer = train_tokenizer(corpus.iter_texts("teacher-train"), vocab_size, "unigram")
        else:
            tokenizer = train_tokenizer(other_texts(), vocab_size, "bpe")
        tokenizer.save_pretrained(student_dir)
        config = json.loads(demo_student_config_path().read_text())
        config["vocab_size"] = len(tokenizer)
        (student_dir / "config.json").write_text(json.dumps(config, indent=2))
    return cache, demo_student_config_path(), student_dir


def train(
    cache: Path, student: Path, run: Path, flags: list[str], seed: int, steps: int,
    lr: float = 3e-3, warmup: int = 10,
) -> float:  # fmt: skip
    """Train one student with ``kdcache train``; returns the wall time in seconds."""
    started = time.perf_counter()
    args = [*_kdcache(), "train", "--cache", str(cache), "--student", str(student), "--out",
            str(run), "--steps", str(steps), "--batch-size", "8", "--lr", str(lr),
            "--warmup-steps", str(warmup), "--seed", str(seed), "--no-progress", "--overwrite",
            *flags]  # fmt: skip
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
    for key in (
        "aligned_fraction",
        "matched_mass",
        "inside_fraction",
        "inside_ce_only_fraction",
        "chunk_fraction",
    ):
        if key in last:
            result[key] = last[key]
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _names(results: dict) -> list[str]:
    """Run names in table order: same/*, then each student's configs in XTOK_CONFIGS order."""
    present = {key.split("@")[0] for key in results}
    order = [f"same/{name}" for name in SAME_CONFIGS]
    order += [f"{student}/{name}" for student in STUDENTS for name in XTOK_CONFIGS]
    return [name for name in order if name in present]


def table(results: dict) -> str:
    """Markdown: bits per byte per run and seed with the alignment counts, then the KD gains
    (CE-only minus KD, same student and seed; positive = better than CE only), relative to CE
    only, and their share of the same-tokenizer pure-KD gain."""
    seeds = sorted({int(key.split("@")[1]) for key in results})
    lines = ["| student / objective | " + " | ".join(f"bpb seed {s}" for s in seeds)
             + " | mean bpb | aligned | inside distilled |",
             "|---" * (len(seeds) + 4) + "|"]  # fmt: skip
    for name in _names(results):
        runs = [results.get(f"{name}@{seed}") for seed in seeds]
        done = [run for run in runs if run]
        cells = [f"{run['bpb']:.4f}" if run else "missing" for run in runs]
        mean_bpb = sum(run["bpb"] for run in done) / len(done)
        stats = [_pct(done[0].get(key)) for key in ("aligned_fraction", "inside_fraction")]
        if name.startswith("same/"):
            stats = ["-"] * 2
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_bpb:.4f} | "
                     + " | ".join(stats) + " |")  # fmt: skip
    lines += ["", "| KD gain (bpb, CE only - KD) | " + " | ".join(f"seed {s}" for s in seeds)
              + " | mean | relative gain (mean) | share of same-tokenizer pure-KD gain "
              "(per seed) |",
              "|---" * (len(seeds) + 4) + "|"]  # fmt: skip
    same_rel = _relative(results, "same/ce", "same/fkl", seeds)
    pairs = [("same/ce", "same/fkl")]
    for name in _names(results):
        student, config = name.split("/", 1)
        if student != "same" and config != "ce":
            pairs.append((f"{student}/ce", name))
    for base, name in pairs:
        gains = _gains(results, base, name, seeds)
        done = [gain for gain in gains.values() if gain is not None]
        if not done:
            continue
        cells = [f"{gains[s]:+.4f}" if gains[s] is not None else "missing" for s in seeds]
        rel = _relative(results, base, name, seeds)
        # a share of a same-tokenizer "gain" <= 0 means nothing: n/a
        share = "n/a" if rel is None or not same_rel or same_rel <= 0 else f"{rel / same_rel:.0%}"
        per_seed = []
        for seed in seeds:
            mine = _relative(results, base, name, [seed])
            same = _relative(results, "same/ce", "same/fkl", [seed])
            ok = mine is not None and same is not None and same > 0
            per_seed.append(f"{mine / same:.0%}" if ok else "-")
        if share != "n/a":
            share += " (" + " / ".join(per_seed) + ")"
        lines.append(f"| {name} vs {base} | " + " | ".join(cells)
                     + f" | {sum(done) / len(done):+.4f} | "
                     + ("-" if rel is None else f"{rel:+.2%}") + f" | {share} |")  # fmt: skip
    return "\n".join(lines)


def _relative(results: dict, base: str, name: str, seeds: list[int]) -> float | None:
    """Mean over seeds of (bpb(base) - bpb(name)) / bpb(base), seeds where both ran."""
    values = [
        (results[f"{base}@{s}"]["bpb"] - results[f"{name}@{s}"]["bpb"])
        / results[f"{base}@{s}"]["bpb"]
        for s in seeds
        if f"{base}@{s}" in results and f"{name}@{s}" in results
    ]
    return sum(values) / len(values) if values else None


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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=3e-3, help="3e-3; 1e-4: kdcache train's")
    parser.add_argument("--warmup-steps", type=int, default=10, help="10; 0: kdcache train's")
    parser.add_argument("--student-tokenizer", choices=["same", *STUDENTS], default="unigram")
    parser.add_argument("--configs", nargs="+", help="configs of that student (default: all)")
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
    student = args.student_tokenizer
    configs = SAME_CONFIGS if student == "same" else XTOK_CONFIGS
    kind = "unigram" if student == "same" else student
    cache, same_student, cross_student = prepare(out, args.vocab_size, kind)
    results_path = out / f"results-{args.worker}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for seed in args.seeds:
        for config in args.configs or list(configs):
            key = f"{student}/{config}@{seed}"
            if key in results:
                continue
            run = out / "runs" / student / config / f"seed{seed}"
            finished = (run / "final" / "config.json").is_file()  # trained earlier: score only
            model = same_student if student == "same" else cross_student
            seconds = 0.0
            if not finished:
                seconds = train(cache, model, run, configs[config], seed, args.steps, args.lr,
                                args.warmup_steps)  # fmt: skip
            results[key] = {**score(cache, run, student == "same"), "train_s": seconds}
            results_path.write_text(json.dumps(results, indent=2))
            print(f"{key}: bpb {results[key]['bpb']:.4f} ({seconds:.0f}s)", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
