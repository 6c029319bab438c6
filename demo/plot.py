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


def plot_runs(
    runs: dict[str, Path],
    path: Path,
    *,
    title: str = "kdcache demo",
    final: dict[str, dict] | None = None,
) -> Path:
    """Draw held-out FKL / RKL to the teacher and held-out CE against the step for every run.

    ``runs`` maps a label ("AKL student") to its run directory. The curves are the runs'
    eval-during-training points, over the first held-out positions (``eval_sequences``); each
    panel says how many. ``final`` (label -> metrics of the final evaluation, with
    ``positions``) adds that evaluation as a star at the last step, labelled with its own
    position count, so the plot and the final table can be read together. Panels without data
    (no eval-during-training metrics) fall back to the training loss. Returns ``path``.
    """
    import matplotlib.pyplot as plt

    fig = draw_runs(runs, title=title, final=final)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_runs(
    runs: dict[str, Path], *, title: str = "kdcache demo", final: dict[str, dict] | None = None
):
    """The matplotlib figure of ``plot_runs`` (same arguments), not saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: read_metrics(run) for label, run in runs.items()}
    has_eval = any(evals for _, evals in data.values())
    panels = (
        [
            ("fkl_bucket", "held-out FKL to teacher, top-k + bucket (nats)"),
            ("rkl_bucket", "held-out RKL to teacher, top-k + bucket (nats)"),
            ("ce", "held-out next-token CE (nats)"),
        ]
        if has_eval
        else []
    )
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.6 * (len(panels) + 1), 3.8))
    axes = list(axes) if len(panels) else [axes]
    curve_positions = {e.get("positions") for _, evals in data.values() for e in evals}
    curve_note = _positions_note(curve_positions)
    for ax, (key, ylabel) in zip(axes, panels, strict=False):
        for label, (train, evals) in data.items():
            points = [(e["step"], e[key]) for e in evals if e.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"{label}{curve_note}")
                done = final.get(label) if final else None
                if done is not None and done.get(key) is not None:
                    last = max([xs[-1], *(e["step"] for e in train)])
                    ax.plot(
                        [last], [done[key]], marker="*", markersize=11, color=line.get_color(),
                        linestyle="none", label=f"{label}, final eval{_positions_note({done.get('positions')})}",
                    )  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
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
    return fig


def _positions_note(counts: set) -> str:
    """' (N held-out positions)' when every entry counted the same N, else ''."""
    counts = {count for count in counts if count is not None}
    return f" ({counts.pop():,} held-out positions)" if len(counts) == 1 else ""
