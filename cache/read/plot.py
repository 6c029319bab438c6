"""One PNG that shows what a cache holds, drawn from a ``CacheReport`` (``kdcache inspect --plot``).

matplotlib is imported inside ``plot_report`` and used through ``matplotlib.figure.Figure`` with the
Agg canvas, so nothing global (the pyplot backend, open figures) changes and no screen is needed.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from kdcache.cache.errors import ConfigError
from kdcache.cache.read.inspect import CacheReport


def plot_report(report: CacheReport, out_path: str | Path) -> Path:
    """Draw a 2x2 figure (top-k mass, kept mass vs k', entropy, manifest summary) to ``out_path``.

    Args:
        report: the result of ``inspect_cache``.
        out_path: a ``.png`` file; its parent directory is created when missing.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_path = Path(out_path)
    if out_path.suffix.lower() != ".png":
        raise ConfigError(f"--plot must name a .png file, got '{out_path}'")
    if out_path.is_dir():
        raise ConfigError(f"--plot '{out_path}' is a directory; give a file name ending in .png")

    figure = Figure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    top_k = report.summary.get("top_k")
    figure.suptitle(f"kdcache inspect: {report.path}", fontsize=13)
    stats = report.stats
    if stats is None:
        for axis in axes.flat[:3]:
            axis.text(0.5, 0.5, "no positions stored", ha="center", va="center")
            axis.set_axis_off()
    else:
        _histogram(
            axes[0, 0],
            stats.topk_mass_histogram,
            median=stats.topk_mass.percentiles[50],
            mean=stats.topk_mass.mean,
            title=f"Teacher probability mass in the stored top-{top_k}",
            xlabel=f"top-{top_k} mass per position",
            color="tab:blue",
        )
        _kept_mass(axes[0, 1], stats)
        _entropy(axes[1, 0], stats)
    _summary_box(axes[1, 1], report)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out_path, dpi=110)
    except OSError as error:
        raise ConfigError(
            f"cannot write the plot to '{out_path}': {error.strerror or error}"
        ) from None
    return out_path


def _histogram(axis, histogram, *, median, mean, title, xlabel, color) -> None:
    edges, counts = histogram.edges, histogram.counts
    total = max(sum(counts), 1)
    widths = [right - left for left, right in itertools.pairwise(edges)]
    shares = [100.0 * count / total for count in counts]
    axis.bar(edges[:-1], shares, width=widths, align="edge", color=color, alpha=0.75)
    axis.axvline(median, color="black", linestyle="--", linewidth=1.2, label=f"median {median:.3f}")
    axis.axvline(mean, color="tab:red", linestyle=":", linewidth=1.5, label=f"mean {mean:.3f}")
    axis.set_title(title, fontsize=11)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("% of positions")
    axis.set_xlim(edges[0], edges[-1])
    axis.legend(loc="upper left")
    axis.grid(alpha=0.3)


def _entropy(axis, stats) -> None:
    for histogram, distribution, color, label in (
        (stats.entropy_histogram, stats.entropy, "tab:green", "top-k + tail bucket (lower bound)"),
        (stats.entropy_upper_histogram, stats.entropy_upper, "tab:purple",
         "tail spread over unstored tokens (upper bound)"),
    ):  # fmt: skip
        edges, counts = histogram.edges, histogram.counts
        total = max(sum(counts), 1)
        widths = [right - left for left, right in itertools.pairwise(edges)]
        shares = [100.0 * count / total for count in counts]
        axis.bar(edges[:-1], shares, width=widths, align="edge", color=color, alpha=0.55,
                 label=f"{label}, mean {distribution.mean:.2f}")  # fmt: skip
        axis.axvline(distribution.mean, color=color, linestyle=":", linewidth=1.5)
    axis.set_title("Teacher entropy per position (bounds from the stored support)", fontsize=11)
    axis.set_xlabel("entropy (nats)")
    axis.set_ylabel("% of positions")
    axis.set_xlim(histogram.edges[0], histogram.edges[-1])
    axis.legend(loc="upper left", fontsize=8.5)
    axis.grid(alpha=0.3)


def _kept_mass(axis, stats) -> None:
    ks = sorted(stats.kept_mass)
    mean = [stats.kept_mass[k].mean for k in ks]

    def band(p: int) -> list[float]:
        return [stats.kept_mass[k].percentiles[p] for k in ks]

    axis.fill_between(ks, band(5), band(95), color="tab:orange", alpha=0.15, label="5-95th pct")
    axis.fill_between(ks, band(25), band(75), color="tab:orange", alpha=0.35, label="25-75th pct")
    axis.plot(ks, band(50), color="tab:orange", linewidth=1.5, label="median")
    axis.plot(ks, mean, color="black", marker="o", linewidth=1.8, label="mean")
    for k, value in zip(ks, mean, strict=True):
        axis.annotate(f"{value:.2f}", (k, value), textcoords="offset points", xytext=(0, 7),
                      ha="center", fontsize=8)  # fmt: skip
    axis.set_xscale("log", base=2)
    axis.set_xticks(ks, [str(k) for k in ks])
    axis.set_ylim(0, 1.05)
    axis.set_title("Mass a smaller k' would have kept", fontsize=11)
    axis.set_xlabel("k' (top entries kept)")
    axis.set_ylabel("teacher probability mass")
    axis.legend(loc="best", fontsize=8.5)
    axis.grid(alpha=0.3, which="both")


def _summary_box(axis, report: CacheReport) -> None:
    axis.set_axis_off()
    lines = [f"{key:<19} {_cell(value)}" for key, value in report.summary.items()]
    sample = report.sample
    how = "all positions" if sample["full"] else f"sample, seed {sample['seed']}"
    lines.append(f"{'statistics':<19} {sample['sampled_positions']:,} positions ({how})")
    lines.append(f"{'shards read':<19} {sample['shards_read']} of {sample['shards_total']}")
    if report.stats is not None:
        lines.append(f"{'mean entropy':<19} {report.stats.entropy.mean:.3f} nats (bucket)")
        lines.append(f"{'  upper bound':<19} {report.stats.entropy_upper.mean:.3f} nats")
    axis.text(0.0, 1.0, "\n".join(lines), family="monospace", fontsize=8.5, va="top",
              ha="left", transform=axis.transAxes, wrap=True)  # fmt: skip
    axis.set_title("Manifest", fontsize=11, loc="left")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
