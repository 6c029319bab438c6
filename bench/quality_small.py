"""Small caches (issue 25): bytes/token against the share of online FKL's gain, through the CLI.

Every cache is written by ``kdcache build`` and every student trained by ``kdcache train`` and
scored by ``kdcache eval --teacher`` (full-vocabulary KL(teacher || student) on the held-out
split); nothing is re-implemented here. Two teachers on the same data (``write_demo_dataset``,
--max-tokens below, 10% held out):

* ``demo``: the shipped demo teacher (16,384 tokens);
* ``sharp``: the demo teacher with its logits doubled (final RMSNorm weight x 2, saved as a new
  model): the demo teacher at temperature 0.5, a teacher that is sure of itself more often.

Per (teacher, seed): ``ce`` (next-token CE only), ``online-fkl`` / ``online-akl`` (the teacher in
the loop, the ceiling) and one student per cache config (``CONFIGS``: build flags) and loss.
The share of a student is (KL_ce - KL_student) / (KL_ce - KL_online) with the online student of
the same loss and seed. Bytes/token are the manifest's (shard bytes / tokens).

    nice -n 5 python bench/quality_small.py --out bench/out/small --teachers sharp demo \
        --configs ce online q8-k24-s16 q8-k8-s8 q8-k8-s16 q8-s32 top64 --losses fkl
    nice -n 5 python bench/quality_small.py --out bench/out/small --teachers sharp demo \
        --configs online q8-k24-s16 q8-k8-s8 --losses akl   # several workers may share --out
    python bench/quality_small.py --out bench/out/small --table

Resumable: each finished (teacher, config, loss, seed) is one json file under ``<out>/results``;
several workers may share one ``--out`` (a run in progress is claimed by a ``.running`` file;
delete the stale ones of a killed worker before resuming).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# cache config -> `kdcache build` flags (every flag explicit: no dependence on the defaults)
CONFIGS: dict[str, list[str]] = {
    "default-v1": ["--top-k", "24", "--tail-samples", "16", "--mode", "exact"],
    "top64": ["--top-k", "64", "--tail-samples", "0", "--encoding", "exact"],
    "k8-s8": ["--top-k", "8", "--tail-samples", "8", "--encoding", "exact"],
    "s16": ["--top-k", "0", "--tail-samples", "16", "--encoding", "exact"],
    "s64": ["--top-k", "0", "--tail-samples", "64", "--encoding", "exact"],
    "q8-k24-s16": ["--top-k", "24", "--tail-samples", "16", "--encoding", "q8"],
    "q8-k8-s8": ["--top-k", "8", "--tail-samples", "8", "--encoding", "q8"],
    "q8-k8-s16": ["--top-k", "8", "--tail-samples", "16", "--encoding", "q8"],
    "q8-k4-s8": ["--top-k", "4", "--tail-samples", "8", "--encoding", "q8"],
    "q8-k4-s16": ["--top-k", "4", "--tail-samples", "16", "--encoding", "q8"],
    "q8-s16": ["--top-k", "0", "--tail-samples", "16", "--encoding", "q8"],
    "q8-s32": ["--top-k", "0", "--tail-samples", "32", "--encoding", "q8"],
    "q8-s64": ["--top-k", "0", "--tail-samples", "64", "--encoding", "q8"],
    "unique-k8-s8": ["--top-k", "8", "--tail-samples", "8", "--encoding", "unique"],
}
BASELINES = ("ce", "online")
OBSERVED_BYTES = 2.0  # issue 26's observed-token column, added to caches built without it
SHARP_FACTOR = 2.0  # the sharp teacher's logits = the demo teacher's x 2 (temperature 0.5)


def _kdcache() -> list[str]:
    return [sys.executable, "-c", "from kdcache.cli.app import main; main()"]


def _run(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)


def prepare(out: Path, max_tokens: int) -> tuple[Path, dict[str, Path]]:
    """(data file, teacher name -> model dir)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.demo import demo_teacher_dir, write_demo_dataset

    data = out / "data" / "demo.jsonl"
    if not data.is_file():
        write_demo_dataset(data, max_tokens=max_tokens)
    sharp = out / "teachers" / "sharp"
    if not (sharp / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(demo_teacher_dir(), dtype=torch.float32)
        with torch.no_grad():
            model.model.norm.weight.mul_(SHARP_FACTOR)  # logits x 2 (the head is linear)
        model.save_pretrained(sharp)
        AutoTokenizer.from_pretrained(demo_teacher_dir()).save_pretrained(sharp)
    return data, {"demo": demo_teacher_dir(), "sharp": sharp}


def build(out: Path, teacher: str, teacher_dir: Path, data: Path, config: str) -> Path:
    import fcntl

    cache = out / "caches" / f"{teacher}-{config}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f"{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per cache among the workers
        if not (cache / "manifest.json").is_file():
            _run([*_kdcache(), "build", "--teacher", str(teacher_dir), "--data", str(data),
              "--out", str(cache), "--max-length", "256", "--holdout", "0.1", "--device", "cpu",
              "--dtype", "float32", "--overwrite", *CONFIGS[config]])  # fmt: skip
    return cache


def train_and_score(
    out: Path, cache: Path, teacher_dir: Path, name: str, flags: list[str], seed: int, args
) -> dict:
    from kdcache.demo import demo_student_config_path

    run = out / "runs" / f"{name}-seed{seed}"
    started = time.perf_counter()
    _run([*_kdcache(), "train", "--cache", str(cache), "--student",
          str(demo_student_config_path()), "--out", str(run), "--steps", str(args.steps),
          "--batch-size", str(args.batch_size), "--lr", "3e-3", "--warmup-steps", "10",
          "--seed", str(seed), "--no-progress", "--overwrite", *flags])  # fmt: skip
    seconds = time.perf_counter() - started
    report = run / "eval.json"
    _run([*_kdcache(), "eval", "--cache", str(cache), "--student", str(run / "final"),
          "--teacher", str(teacher_dir), "--split", "holdout", "--max-sequences",
          str(args.eval_sequences), "--json", str(report)])  # fmt: skip
    return {"eval": json.loads(report.read_text()), "train_seconds": seconds}


def _heldout_kl(result: dict) -> float:
    """KL(teacher || student) on the held-out split from an ``eval.json``."""
    found = _find(result["eval"], "fkl_full")
    if found is None:
        raise KeyError(f"no teacher FKL in {json.dumps(result['eval'])[:400]}")
    return float(found)


def _find(value, key: str):
    if isinstance(value, dict):
        if key in value:
            return value[key]
        for child in value.values():
            found = _find(child, key)
            if found is not None:
                return found
    if isinstance(value, list):
        for child in value:
            found = _find(child, key)
            if found is not None:
                return found
    return None


def run_study(args) -> None:
    out = args.out
    data, teachers = prepare(out, args.max_tokens)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    for teacher in args.teachers:
        base_cache = build(out, teacher, teachers[teacher], data, "default-v1")
        for seed in args.seeds:
            for config in args.configs:
                for loss in args.losses if config != "ce" else ["ce"]:
                    key = f"{teacher}-{config}-{loss}-seed{seed}"
                    path = results / f"{key}.json"
                    claim = results / f"{key}.running"  # several workers share one --out
                    if path.is_file() or claim.exists():
                        continue
                    claim.write_text(str(os.getpid()))
                    if config == "ce":
                        cache, flags = base_cache, ["--loss", "ce"]
                    elif config == "online":
                        cache = base_cache
                        flags = ["--teacher", str(teachers[teacher]), "--loss", loss,
                                 "--ce-weight", "0"]  # fmt: skip
                    else:
                        cache = build(out, teacher, teachers[teacher], data, config)
                        flags = ["--loss", loss, "--ce-weight", "0"]
                    result = train_and_score(out, cache, teachers[teacher],
                                             f"{teacher}-{config}-{loss}", flags, seed, args)  # fmt: skip
                    manifest = json.loads((cache / "manifest.json").read_text())
                    result.update(teacher=teacher, config=config, loss=loss, seed=seed,
                                  steps=args.steps, bytes_per_token=manifest["bytes"]
                                  / manifest["num_tokens"], flags=flags,
                                  observed=bool(manifest.get("observed_logprobs")),
                                  build_flags=CONFIGS.get(config))  # fmt: skip
                    path.write_text(json.dumps(result, indent=1))
                    claim.unlink()
                    print(f"{key}: KL {_heldout_kl(result):.4f}", flush=True)


def _has_observed(out: Path, result: dict) -> bool:
    """Whether the result's cache holds the observed-token column (older results: its manifest)."""
    if "observed" in result:
        return bool(result["observed"])
    config = "default-v1" if result["config"] in BASELINES else result["config"]
    manifest = out / "caches" / f"{result['teacher']}-{config}" / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("observed_logprobs"))


def table(out: Path) -> str:
    """Markdown: per teacher and loss, bytes/token, the held-out KL per seed and its share of the
    online FKL student's gain over CE only (the issue's yardstick, for every loss: online AKL
    barely moves KL(teacher || student), so a share of its gain would mean nothing)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    kl = {(r["teacher"], r["config"], r["loss"], r["seed"]): _heldout_kl(r) for r in rows}
    # bytes/token with the observed-token column (issue 26; on by default): measured where the
    # cache has it, else + OBSERVED_BYTES (caches built before it)
    sizes = {(r["teacher"], r["config"]): r["bytes_per_token"]
             + (0.0 if _has_observed(out, r) else OBSERVED_BYTES) for r in rows}  # fmt: skip
    lines = []
    for teacher in sorted({r["teacher"] for r in rows}):
        seeds = sorted({s for (t, _, _, s) in kl if t == teacher})

        def per_seed(config: str, loss: str, teacher: str = teacher, seeds=seeds) -> str:
            return " / ".join(
                "-" if kl.get((teacher, config, loss, s)) is None
                else f"{kl[(teacher, config, loss, s)]:.3f}" for s in seeds)  # fmt: skip

        lines += [f"\n{teacher} teacher: held-out KL(teacher || student) per seed {seeds}: "
                  f"CE only {per_seed('ce', 'ce')}; online FKL {per_seed('online', 'fkl')}; "
                  f"online AKL {per_seed('online', 'akl')}\n",
                  "| cache | build flags | B/token (with observed) | loss | KL per seed | "
                  "share of online FKL's gain, per seed | worst (seeds) |",
                  "|---|---|---:|---|---|---|---:|"]  # fmt: skip
        for loss in ("fkl", "akl"):
            configs = sorted({c for (t, c, lo, _) in kl if t == teacher and lo == loss
                              and c not in BASELINES}, key=lambda c: sizes[(teacher, c)])  # fmt: skip
            for config in configs:
                shares = []
                for seed in seeds:
                    ce = kl.get((teacher, "ce", "ce", seed))
                    online = kl.get((teacher, "online", "fkl", seed))
                    value = kl.get((teacher, config, loss, seed))
                    ok = None not in (ce, online, value)
                    shares.append((ce - value) / (ce - online) if ok else None)
                text = " / ".join("-" if s is None else f"{s:.0%}" for s in shares)
                known = [s for s in shares if s is not None]
                worst = f"{min(known):.0%} ({len(known)})" if known else "-"
                flags = " ".join(CONFIGS[config])
                size = sizes[(teacher, config)]
                lines.append(f"| {config} | `{flags}` | {size:.1f} | {loss} | "
                             f"{per_seed(config, loss)} | {text} | {worst} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/small"))
    parser.add_argument("--teachers", nargs="+", default=["sharp", "demo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=["ce", "online", *CONFIGS])
    parser.add_argument("--losses", nargs="+", default=["fkl"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-sequences", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=150_000)
    parser.add_argument("--table", action="store_true", help="print the tables and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    unknown = [c for c in args.configs if c not in (*BASELINES, *CONFIGS)]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join((*BASELINES, *CONFIGS))}")
    run_study(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
