"""Loss curves of the demo students (PNG, matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The ``train`` and ``eval`` lines of ``<run_dir>/metrics.jsonl`` (empty lists if absent)."""
    path = Path(run_dir) / METRICS_FILE
    train, evals = [], []
    if not path.is_file():
        return train, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        (evals if entry.get("kind") == "eval" else train).append(entry)
    return train, evals


def plot_runs(runs: dict[str, Path], path: Path, *, title: str = "kdcache demo") -> Path:
    """Draw held-out FKL / RKL to the teacher and held-out CE against the step for every run.

    ``runs`` maps a label ("AKL student") to its run directory. Panels without data (no
    eval-during-training metrics) fall back to the training loss. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: read_metrics(run) for label, run in runs.items()}
    has_eval = any(evals for _, evals in data.values())
    panels = (
        [
            ("fkl", "held-out FKL to teacher (nats)"),
            ("rkl", "held-out RKL to teacher (nats)"),
            ("ce", "held-out next-token CE (nats)"),
        ]
        if has_eval
        else []
    )
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.6 * (len(panels) + 1), 3.8))
    axes = list(axes) if len(panels) else [axes]
    for ax, (key, ylabel) in zip(axes, panels, strict=False):
        for label, (_, evals) in data.items():
            points = [(e["step"], e[key]) for e in evals if key in e]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    for label, (train, _) in data.items():
        points = [(e["step"], e["loss"]) for e in train if "loss" in e]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (each student's own objective)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
