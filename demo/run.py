"""``run_demo``: the whole pipeline on the embedded defaults, offline, in minutes on a laptop CPU.

1. write the held-out ``demo`` split of the stdlib corpus as jsonl (files the teacher never saw);
2. build the cache with the shipped demo teacher (``build_cache``; a no-op when it is complete);
3. train two students of the same size from the same init, data order and steps: one with AKL
   against the cached teacher mixed with next-token CE (``ce_weight``, 0.5: the top-64 cache's
   tail bucket says how much mass is outside the top-64 but not where, and the tokens supply
   that; measured better held-out CE than pure AKL), one on the next tokens alone (CE);
4. evaluate both on the cache's holdout split (CE / perplexity, FKL / RKL to the teacher, top-1
   agreement), print the comparison and write it as JSON;
5. draw the held-out curves of both students into ``<runs>/loss_curves.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kdcache.cache.errors import ConfigError
from kdcache.demo import DEMO_BUILD_SETTINGS


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. ``DemoSettings()`` is the real demo; ``QUICK`` is for tests."""

    max_tokens: int | None = None  # cap on the demo dataset (None: the whole held-out split)
    top_k: int = int(DEMO_BUILD_SETTINGS["top_k"])  # teacher entries stored per position
    max_length: int = int(DEMO_BUILD_SETTINGS["max_length"])  # tokens per packed sequence
    holdout: float = float(DEMO_BUILD_SETTINGS["holdout"])  # fraction of rows held out
    steps: int = 200  # optimizer steps of each student
    batch_size: int = 8  # sequences per step
    lr: float = 3e-3  # peak learning rate (AdamW, warmup + cosine)
    warmup_steps: int = 10
    eval_every: int = 10  # held-out metrics during training (for the plot); 0 = off
    eval_sequences: int = 16  # holdout sequences used by eval_every
    seed: int = 0  # student init and data order (same for both students)
    ce_weight: float = 0.5  # the AKL student's loss: (1 - w) * AKL + w * next-token CE


QUICK = DemoSettings(
    max_tokens=6000,
    top_k=8,
    max_length=64,
    holdout=0.25,
    steps=3,
    batch_size=2,
    warmup_steps=0,
    eval_every=3,
    eval_sequences=2,
)

STUDENTS: dict[str, dict[str, Any]] = {
    "akl": {"loss": "akl", "label": "AKL student"},  # + ce_weight x CE (DemoSettings)
    "ce": {"loss": "ce", "label": "CE student"},
}


def _teacher_report() -> dict[str, Any] | None:
    from kdcache.demo import demo_teacher_dir

    path = demo_teacher_dir() / "training.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def format_comparison(results: dict[str, dict[str, float]], labels: dict[str, str]) -> str:
    """The students side by side (rows: metrics; columns: students; last column: better)."""
    from kdcache.trainer.evaluation import format_metric

    rows = [
        ("ce", "held-out CE (nats)", min),
        ("ppl", "held-out perplexity", min),
        ("fkl_bucket", "FKL to teacher (bucket)", min),
        ("rkl_bucket", "RKL to teacher (bucket)", min),
        ("fkl_unbiased", "FKL to teacher (unb.)", min),
        ("top1", "top-1 agreement", max),
    ]
    names = list(results)
    width = max(12, *(len(labels[n]) for n in names))
    lines = [f"{'':<24}" + "".join(f"  {labels[n]:>{width}}" for n in names) + "  better"]
    for key, title, best in rows:
        values = {n: results[n].get(key) for n in names}
        known = {n: value for n, value in values.items() if value is not None}
        if not known:
            continue  # a measure this cache cannot give (n/a for every student)
        winner = labels[best(known, key=known.get)]
        cells = "".join(f"  {format_metric(values[n], width)}" for n in names)
        lines.append(f"{title:<24}{cells}  {winner}")
    return "\n".join(lines)


def run_demo(
    out: Path | str = Path("kdcache-demo"),
    *,
    steps: int | None = None,
    quick: bool = False,
    settings: DemoSettings | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the demo cache, train an AKL and a CE student, evaluate and plot both.

    ``out`` receives ``data/demo.jsonl``, ``cache/`` and ``runs/{akl,ce}/``, ``runs/eval.json``
    and ``runs/loss_curves.png``. ``steps`` overrides the steps of both students; ``quick`` uses
    tiny sizes (tests). Returns ``{"results": {name: metrics}, "plot", "eval_json", "seconds",
    "settings", "cache"}``.
    """
    from kdcache.cache.build.pipeline import BuildConfig, build_cache
    from kdcache.demo import (
        demo_student_config_path,
        demo_teacher_dir,
        write_demo_dataset,
    )
    from kdcache.demo.plot import plot_runs
    from kdcache.trainer.config import EvalConfig, TrainConfig
    from kdcache.trainer.evaluation import evaluate
    from kdcache.trainer.loop import train

    s = settings or (QUICK if quick else DemoSettings())
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        s = replace(s, steps=steps, eval_every=max(1, steps // 10) if s.eval_every else 0)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory for the demo")
    started = time.perf_counter()
    teacher = demo_teacher_dir()
    report = _teacher_report()
    ppl = "" if report is None else f" (held-out perplexity {report['perplexity']['demo']:.1f})"
    echo(
        f"kdcache demo: using the demo defaults - teacher {teacher}{ppl}, data: held-out stdlib "
        f"files, {s.steps} steps per student, output in {out}/"
    )

    echo("[1/4] writing the demo dataset (stdlib files the teacher never saw)")
    data = write_demo_dataset(out / "data" / "demo.jsonl", max_tokens=s.max_tokens)

    echo(f"[2/4] building the teacher cache (top-{s.top_k}) in {out / 'cache'}")
    build = BuildConfig(
        teacher=str(teacher),
        data=str(data),
        out=out / "cache",
        top_k=s.top_k,
        max_length=s.max_length,
        holdout=s.holdout,
        device="cpu",
        overwrite=True,  # the demo's own directory: replace a cache built with other sizes
        progress=progress,
    )
    summary = build_cache(build)
    echo("      " + summary.line())
    cache_dir = str(summary.out)

    runs = out / "runs"
    finals: dict[str, str] = {}
    for i, (name, spec) in enumerate(STUDENTS.items(), start=1):
        mix = f" --ce-weight {s.ce_weight}" if spec["loss"] != "ce" and s.ce_weight else ""
        echo(
            f"[3/4] training student {i}/{len(STUDENTS)}: {spec['label']} (--loss {spec['loss']}{mix})"
        )
        result = train(
            TrainConfig(
                cache=cache_dir,
                student=str(demo_student_config_path()),
                out=str(runs / name),
                loss=spec["loss"],
                ce_weight=s.ce_weight if spec["loss"] != "ce" else 0.0,
                steps=s.steps,
                batch_size=s.batch_size,
                lr=s.lr,
                warmup_steps=s.warmup_steps,
                seed=s.seed,
                eval_every=s.eval_every,
                eval_sequences=s.eval_sequences,
                log_every=max(1, s.steps // 50),
                device="cpu",
                overwrite=True,
                progress=progress,
            )
        )
        finals[name] = str(result.final)
        echo(f"      {result.steps} steps, {result.tokens} tokens in {result.seconds:.0f}s")

    echo("[4/4] evaluating both students on the cache's holdout split")
    eval_json = runs / "eval.json"
    report_eval = evaluate(
        EvalConfig(
            cache=cache_dir,
            students=list(finals.values()),
            json_path=str(eval_json),
            device="cpu",
        )
    )
    results = {name: report_eval["students"][path] for name, path in finals.items()}
    labels = {name: spec["label"] for name, spec in STUDENTS.items()}
    plot = plot_runs(
        {labels[name]: runs / name for name in STUDENTS},
        runs / "loss_curves.png",
        title=f"kdcache demo: same student, same data, {s.steps} steps",
        final={labels[name]: metrics for name, metrics in results.items()},
    )
    seconds = time.perf_counter() - started
    summary_json = {
        "results": results,
        "settings": asdict(s),
        "teacher": report and report.get("perplexity"),
        "seconds": round(seconds, 1),
    }
    (runs / "demo.json").write_text(json.dumps(summary_json, indent=2) + "\n", encoding="utf-8")
    echo("")
    echo(format_comparison(results, labels))
    echo(
        f"({results['akl']['positions']} held-out positions; both students "
        f"{s.steps} steps x {s.batch_size} sequences x {s.max_length} tokens, same init and order)"
    )
    echo(
        f"loss curves: {plot} (curves: every {s.eval_every} steps on the first "
        f"{s.eval_sequences} held-out sequences; stars: this table's final evaluation)"
    )
    echo(f"results: {eval_json}; students: {finals['akl']}, {finals['ce']}")
    echo(f"done in {seconds:.0f}s")
    return {
        "results": results,
        "plot": plot,
        "eval_json": eval_json,
        "seconds": seconds,
        "settings": s,
        "cache": Path(cache_dir),
    }
