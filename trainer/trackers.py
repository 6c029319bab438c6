"""Experiment trackers (``--report-to``): every metrics.jsonl line also goes to TensorBoard,
Weights & Biases, MLflow or Trackio, under stable names, from rank 0 only.

The names and semantics are Hugging Face Trainer's ``report_to``: a comma-separated list of
``tensorboard``, ``wandb``, ``mlflow``, ``trackio``; ``none`` (the default) logs to metrics.jsonl
alone and ``all`` to every one of them that is installed. The loop calls one thing,
``MetricsLog.log(entry)``: it appends the line to metrics.jsonl and sends the entry's numbers to
each tracker as ``train/<key>`` or ``eval/<key>`` at the entry's step (``train/loss``,
``train/lr``, ``train/grad_norm``, ``train/tokens``, ``train/tokens_per_s``, ``train/elapsed_s``,
``train/epoch``, ``eval/kl_fkl`` ...). The run's settings (run.json) are logged once, at the start.

Where each tracker writes follows its own environment variables, as under HF Trainer:
``WANDB_PROJECT`` / ``WANDB_MODE`` / ``WANDB_DIR``, ``MLFLOW_TRACKING_URI`` /
``MLFLOW_EXPERIMENT_NAME``, ``TRACKIO_PROJECT`` / ``TRACKIO_DIR``; TensorBoard writes event files
into the run directory itself (``tensorboard --logdir runs`` shows each run by its folder). A tracker whose package is missing is refused before training starts,
in one line naming the extra that installs it.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from kdcache.cache.errors import ConfigError

__all__ = [
    "BACKENDS",
    "MetricsLog",
    "check_report_to",
    "metric_name",
    "parse_report_to",
    "start_metrics_log",
    "tracker_metrics",
]

# backend (also the name of its kdcache extra) -> (module, distributions providing it, oldest version)
_REQUIREMENTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "tensorboard": ("tensorboard", ("tensorboard",), "2.10"),
    "wandb": ("wandb", ("wandb",), "0.15"),
    "mlflow": ("mlflow", ("mlflow", "mlflow-skinny"), "2.8"),
    "trackio": ("trackio", ("trackio",), "0.2"),
}
BACKENDS: tuple[str, ...] = tuple(_REQUIREMENTS)
DEFAULT_PROJECT = "kdcache"  # wandb project / mlflow experiment / trackio project
_ENTRY_FIELDS = ("kind", "step", "split")  # what an entry says about itself, not a metric


def parse_report_to(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The backends named by ``--report-to`` (comma-separated; ``none``; ``all``: the installed).

    Unknown names are refused naming the nearest valid one.
    """
    if value is None:
        return ()
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [name.strip().lower() for name in names if name.strip()]
    valid = (*BACKENDS, "all", "none")
    for name in names:
        if name not in valid:
            nearest = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {nearest[0]}?)" if nearest else ""
            raise ConfigError(
                f"unknown --report-to {name!r}{hint}; choose from {', '.join(valid)}, "
                "comma-separated"
            )
    if "none" in names:
        return ()
    if "all" in names:
        return tuple(name for name in BACKENDS if _installed(name))
    return tuple(dict.fromkeys(names))  # de-duplicated, in the given order


def _installed(backend: str) -> bool:
    module = _REQUIREMENTS[backend][0]
    return importlib.util.find_spec(module) is not None


def check_report_to(backends: tuple[str, ...]) -> None:
    """ConfigError (one line, naming the extra) when a backend's package is missing or too old."""
    from kdcache.cache.requirements import check_min_version, installed_version

    for backend in backends:
        module, distributions, minimum = _REQUIREMENTS[backend]
        installed = [name for name in distributions if installed_version(name) is not None]
        if not installed or importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--report-to {backend} needs the {module} package: "
                f"pip install 'kdcache[{backend}]'"
            )
        check_min_version(installed[0], minimum, extra=backend)


def metric_name(kind: str, key: str) -> str:
    """The stable tracker name of metrics.jsonl field ``key`` of a ``kind`` line (``train/loss``)."""
    return f"{kind}/{key}"


def tracker_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of one metrics.jsonl entry under their tracker names.

    Non-numeric fields and NaN/inf (``grad_norm`` with clipping off) stay in metrics.jsonl only.
    """
    kind = str(entry.get("kind", "train"))
    metrics = {}
    for key, value in entry.items():
        if key in _ENTRY_FIELDS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            metrics[metric_name(kind, key)] = float(value)
    return metrics


class _TensorBoard:
    def __init__(self, out: Path, run_name: str, settings: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out))  # `tensorboard --logdir runs`: one per run
        self.writer.add_text("settings", json.dumps(settings, indent=2), global_step=0)
        self.writer.add_text("run_name", run_name, global_step=0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, run_name: str, settings: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            name=run_name,
            config=settings,
            dir=os.environ.get("WANDB_DIR", str(out)),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, out: Path, run_name: str, settings: dict[str, Any]) -> None:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, as mlflow itself reads it
        if uri.startswith("file:") or "://" not in uri:
            # a local file store (mlflow-skinny's default, ./mlruns) is refused by mlflow 3 unless
            # allowed: the user chose it (or has no server), so allow it unless they said otherwise
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        experiment = client.get_experiment_by_name(name)
        experiment_id = (
            client.create_experiment(name) if experiment is None else experiment.experiment_id
        )
        self.run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in settings.items()]
        client.log_batch(self.run_id, params=params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, value, now, step) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class _Trackio:
    def __init__(self, out: Path, run_name: str, settings: dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        project = os.environ.get("TRACKIO_PROJECT", DEFAULT_PROJECT)
        self.run = trackio.init(project=project, name=run_name, config=settings)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def finish(self) -> None:
        self.trackio.finish()


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow, "trackio": _Trackio}


def start_metrics_log(
    out: Path, backends: tuple[str, ...], run_name: str, settings: dict[str, Any], *, fresh: bool
) -> MetricsLog:
    """``MetricsLog`` of a run whose directory was just started; a tracker that cannot start is
    refused in one line, and a ``fresh`` run (not a resume) leaves no run directory behind."""
    try:
        return MetricsLog(out, backends, run_name, settings)
    except ConfigError:
        if fresh:  # everything in out was written by this run (--overwrite cleared the old one)
            shutil.rmtree(out, ignore_errors=True)
        raise


class MetricsLog:
    """metrics.jsonl plus the ``--report-to`` trackers of one run (only rank 0 makes one)."""

    def __init__(
        self, out: Path, backends: tuple[str, ...], run_name: str, settings: dict[str, Any]
    ) -> None:
        self.out = Path(out)
        self.trackers: list[Any] = []
        for name in backends:
            try:
                self.trackers.append(_TRACKERS[name](self.out, run_name, settings))
            except Exception as error:  # the tracker's own setup (URI, login, server)
                self.finish()
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise ConfigError(f"--report-to {name} could not start: {first_line}") from error

    def log(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` to metrics.jsonl and send its numbers to every tracker."""
        from kdcache.trainer.checkpoint import append_metrics

        append_metrics(self.out, entry)
        metrics = tracker_metrics(entry)
        if metrics:
            for tracker in self.trackers:
                tracker.log(metrics, int(entry["step"]))

    def finish(self) -> None:
        """Close every tracker (flushes event files, marks the runs finished)."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
