"""Cross-tokenizer study: the demo teacher's cache, a student with another BPE (8,192 tokens).

Same body, seed, steps and data (the demo cache's train split) for every student:

* same tokenizer (the teacher's 16,384-token BPE): CE only, and AKL + 0.5 CE (the demo's KD);
* the student BPE (8,192 tokens, trained like the teacher's on the teacher-train files):
  CE only, cross-tokenizer KD with exact matches only (``--uld-weight 0``), and exact matches
  + ULD (``--uld-weight 1``); AKL + 0.5 CE like the same-tokenizer KD student.

Every student is trained with ``kdcache train`` (the real CLI) and scored on the cache's holdout
split in bits per byte on its own tokenization (``bits_per_byte``). Resumable: finished runs are
skipped. Results go to ``<out>/results-<worker>.json``; ``--table`` prints the markdown table
of all of them.

    python bench/quality_xtok.py --out bench/out/xtok --steps 150 --seeds 0 1
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
# The KD students use the defaults (``--vocab-map prefix``, ``--distill-inside``); the ``old/*``
# ones the behaviour before them (exact matches only, boundary positions only).
_KD = ["--loss", "akl", "--ce-weight", "0.5", "--cross-tokenizer"]
_OLD = ["--vocab-map", "exact", "--no-distill-inside"]
CONFIGS: dict[str, dict] = {
    "same/ce": {"student": "same", "flags": ["--loss", "ce"]},
    "same/akl": {"student": "same", "flags": ["--loss", "akl", "--ce-weight", "0.5"]},
    "xtok/ce": {"student": "xtok", "flags": ["--loss", "ce", "--cross-tokenizer"]},
    "xtok/exact": {"student": "xtok", "flags": [*_KD, "--uld-weight", "0"]},
    "xtok/exact+uld": {"student": "xtok", "flags": [*_KD, "--uld-weight", "1"]},
    "xtok/prefix-only": {"student": "xtok",
                         "flags": [*_KD, "--uld-weight", "0", "--no-distill-inside"]},
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdcache.demo.train_teacher import CHAT_TEMPLATE, EOS, IM_END, IM_START, PAD, SPECIAL_TOKENS

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


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


def table(results: dict) -> str:
    """Markdown: one row per config, bits per byte per seed, mean, and the alignment stats."""
    seeds = sorted({int(key.split("@")[1]) for key in results})
    lines = ["| student | " + " | ".join(f"bpb seed {s}" for s in seeds)
             + " | mean bpb | CE own tokens (mean) | aligned | exact-match mass |",
             "|---" * (len(seeds) + 5) + "|"]  # fmt: skip
    for name in CONFIGS:
        runs = [results.get(f"{name}@{seed}") for seed in seeds]
        done = [run for run in runs if run]
        if not done:
            continue
        cells = [f"{run['bpb']:.4f}" if run else "-" for run in runs]
        mean_bpb = sum(run["bpb"] for run in done) / len(done)
        mean_ce = sum(run["ce"] for run in done) / len(done)
        aligned = done[0].get("aligned_fraction")
        matched = done[0].get("matched_mass")
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {mean_bpb:.4f} | {mean_ce:.3f} | "
            + (f"{aligned:.1%}" if aligned is not None else "-") + " | "
            + (f"{matched:.1%}" if matched is not None else "-") + " |"
        )  # fmt: skip
    return "\n".join(lines)


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
