"""Tables and plots of the distillation-quality study (``bench/quality.py``'s results).

    python bench/quality_report.py --results bench/quality-results --img docs/img

Prints markdown tables (pasted into docs/QUALITY.md) and writes ``quality_kl_<setting>.png`` and
``quality_headtail.png``. Every number is the mean over the seeds that finished (the count is in
the table); the +- is the spread (half the range) across seeds.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

CACHED_MODES = ("top8", "top64", "tail", "rskd")
MODE_BYTES = {"top8": "top8", "top64": "top64", "tail": "tail", "rskd": "rskd"}


def load(results_dir: Path) -> tuple[dict, dict, dict]:
    """(runs by (setting, config, alpha) -> {seed: curve}, setting info, study settings)."""
    runs: dict = defaultdict(dict)
    settings, study = {}, {}
    for path in sorted(results_dir.glob("results-*.json")):
        data = json.loads(path.read_text())
        settings.update(data["settings"])
        study = data.get("study", study)
        for key, run in data["runs"].items():
            setting, seed, config, alpha = key.split("/")
            runs[(setting, config, float(alpha))][int(seed)] = run["curve"]
    return runs, settings, study


def final(curves: dict, metric: str) -> tuple[float, float, int]:
    values = np.array([curve[-1][metric] for curve in curves.values()])
    return float(values.mean()), float((values.max() - values.min()) / 2), len(values)


def bytes_of(config: str, info: dict) -> str:
    mode = config.split("-")[0]
    if mode in MODE_BYTES:
        return f"{info['bytes_per_token'][MODE_BYTES[mode]]:.0f}"
    return "-" if mode == "ce" else "(online)"


REFERENCE = "online-fkl"  # the ceiling: online full-vocabulary FKL, no CE mix


def shares(runs: dict, setting: str, curves: dict) -> tuple[float, list[float]] | None:
    """Share of online FKL's gain over CE-only, ``(KL_ce - KL) / (KL_ce - KL_online)``, on the
    seeds this row, CE-only and online FKL all have: (share of the means, per-seed shares)."""
    ce_runs = runs.get((setting, "ce", 1.0), {})
    online_runs = runs.get((setting, REFERENCE, 0.0), {})
    seeds = [seed for seed in curves if seed in ce_runs and seed in online_runs]
    if not seeds:
        return None

    def kl(group: dict, seed: int) -> float:
        return group[seed][-1]["kl"]

    ce = np.array([kl(ce_runs, seed) for seed in seeds])
    online = np.array([kl(online_runs, seed) for seed in seeds])
    mine = np.array([kl(curves, seed) for seed in seeds])
    per_seed = ((ce - mine) / (ce - online)).tolist()
    return float((ce.mean() - mine.mean()) / (ce.mean() - online.mean())), per_seed


def table(runs: dict, settings: dict, setting: str) -> str:
    """Markdown: one row per (config, alpha), sorted by final held-out KL."""
    info = settings[setting]
    lines = [
        "| config | CE mix | seeds | held-out KL(teacher‖student) | next-token CE | ppl | top-1 "
        "agree | bytes/token | % of online FKL gain [seed range] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(key, curves) for key, curves in runs.items() if key[0] == setting]
    rows.sort(key=lambda item: final(item[1], "kl")[0])
    for (_, config, alpha), curves in rows:
        kl, spread, n = final(curves, "kl")
        ce_value = final(curves, "ce")[0]
        gain = "-"
        share = shares(runs, setting, curves) if config != "ce" else None
        if share is not None:
            gain = f"{100 * share[0]:.0f}%"
            if len(share[1]) > 1:
                gain += f" [{100 * min(share[1]):.0f}, {100 * max(share[1]):.0f}]"
        lines.append(
            f"| {config} | {'-' if config == 'ce' else f'{alpha:g}'} | {n} | {kl:.3f} ± {spread:.3f} "
            f"| {ce_value:.3f} | {np.exp(ce_value):.0f} | {final(curves, 'top1')[0]:.3f} "
            f"| {bytes_of(config, info)} | {gain} |"
        )
    return "\n".join(lines)


def mean_curve(curves: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([point["step"] for point in next(iter(curves.values()))])
    values = np.array([[point[metric] for point in curve] for curve in curves.values()])
    return steps, values.mean(0)


def plot_kl(runs: dict, setting: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"ce": "k-", "online": "-", "top8": ":", "top64": "--", "tail": "-.", "rskd": ":"}
    for (s, config, alpha), curves in sorted(runs.items()):
        if s != setting or alpha not in (0.0, 1.0):
            continue
        steps, kl = mean_curve(curves, "kl")
        style = styles[config.split("-")[0]]
        ax.plot(steps, kl, style, label=f"{config} ({len(curves)} seeds)", linewidth=1.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out KL(teacher || student), nats")
    ax.set_title(f"Held-out KL to the full teacher vs steps ({setting} setting, no CE mix)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_head_tail(runs: dict, settings: list[str], path: Path) -> None:
    """Head gap and tail gap (AKL's split at mu) vs steps for online FKL / RKL / AKL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 3.6 * len(settings)), squeeze=False)
    colors = {"fkl": "tab:blue", "rkl": "tab:red", "akl": "tab:green"}
    for row, setting in enumerate(settings):
        for column, metric in enumerate(("head_gap", "tail_gap")):
            ax = axes[row][column]
            for kind, color in colors.items():
                curves = runs.get((setting, f"online-{kind}", 0.0))
                if curves:
                    steps, values = mean_curve(curves, metric)
                    ax.plot(steps, values, color=color, label=f"online {kind.upper()}")
            ax.set_title(f"{setting}: {metric.replace('_', ' ')} (sum |p - q| over the "
                         f"{'head' if column == 0 else 'tail'})")  # fmt: skip
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def head_tail_table(runs: dict, setting: str) -> str:
    """Markdown: online FKL / RKL / AKL head and tail gaps at step 0, the first eval, the end."""
    lines = [
        "| online loss | head gap | tail gap | held-out KL at the end |",
        "|---|---|---|---|",
    ]
    for kind in ("fkl", "rkl", "akl"):
        curves = runs.get((setting, f"online-{kind}", 0.0))
        if not curves:
            continue
        steps, head = mean_curve(curves, "head_gap")
        _, tail = mean_curve(curves, "tail_gap")
        _, kl = mean_curve(curves, "kl")
        picks = [0, 1, len(steps) - 1]

        def cells(values: np.ndarray, picks: list[int] = picks) -> str:
            return " → ".join(f"{values[i]:.3f}" for i in picks)

        lines.append(f"| {kind.upper()} | {cells(head)} | {cells(tail)} | {kl[-1]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("bench/quality-results"))
    parser.add_argument("--img", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    runs, settings, study = load(args.results)
    args.img.mkdir(parents=True, exist_ok=True)
    print(f"study settings: {json.dumps(study)}\n")
    for setting, info in settings.items():
        print(f"### {setting}\n")
        print(
            f"teacher entropy {info['teacher_entropy']:.2f} nats, top-8 mass median "
            f"{info['top8_mass_median']:.2f}, top-64 mass median {info['top64_mass_median']:.2f}, "
            f"{info['train_sequences']} training sequences\n"
        )
        print(table(runs, settings, setting) + "\n")
        print("head / tail gaps of the online runs (steps 0 → first eval → last):\n")
        print(head_tail_table(runs, setting) + "\n")
        plot_kl(runs, setting, args.img / f"quality_kl_{setting}.png")
    plot_head_tail(runs, list(settings), args.img / "quality_headtail.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
