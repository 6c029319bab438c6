"""``kdcache train --report-to``: every metrics.jsonl number reaches each tracker, read back offline.

TensorBoard event files are read with tensorboard's EventAccumulator, wandb runs in offline mode
and its ``.wandb`` record file is decoded, MLflow writes to a local file store read back with
MlflowClient, Trackio to a local SQLite database read back with its own storage class. Nothing
touches the network.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cache.errors import ConfigError
from kdcache.cli.app import app
from kdcache.trainer.trackers import parse_report_to, tracker_metrics
from tests import train_helpers as helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    return helpers.make_cache(tmp_path_factory.mktemp("cache"), tiny_llama_dir,
                              helpers.read_texts(text_jsonl), num_train=12, num_holdout=4)  # fmt: skip


@pytest.fixture(scope="module")
def student_json(tmp_path_factory, tiny_tokenizer) -> Path:
    return helpers.student_config(tmp_path_factory.mktemp("student") / "s.json", tiny_tokenizer)


def _train(cache: Path, student: Path, out: Path, *extra: str):
    args = ["train", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--log-every", "1",
            "--eval-every", "2", "--no-progress", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def _jsonl_metrics(out: Path) -> dict[tuple[str, int], float]:
    """{(tracker name, step): value} from metrics.jsonl: what every tracker must hold."""
    expected = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for name, value in tracker_metrics(entry).items():
            expected[(name, entry["step"])] = value
    return expected


def _settings(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


# -- names and refusals ---------------------------------------------------------------------------


def test_report_to_follows_hugging_face_names():
    assert parse_report_to("none") == () and parse_report_to(None) == ()
    assert parse_report_to("tensorboard, wandb,tensorboard") == ("tensorboard", "wandb")
    assert parse_report_to("wandb,none") == ()  # HF: none wins
    installed = parse_report_to("all")
    for name in ("tensorboard", "wandb", "mlflow", "trackio"):
        assert (name in installed) == (importlib.util.find_spec(name) is not None)
    with pytest.raises(
        ConfigError, match=r"unknown --report-to 'tensorbord' \(did you mean tensorboard\?\)"
    ):
        parse_report_to("tensorbord")


def test_tracker_names_are_stable_and_keep_only_finite_numbers():
    entry = {"kind": "train", "step": 7, "epoch": 0, "loss": 1.5, "grad_norm": float("nan"),
             "lr": 1e-3, "tokens": 100}  # fmt: skip
    assert tracker_metrics(entry) == {"train/epoch": 0.0, "train/loss": 1.5, "train/lr": 1e-3,
                                      "train/tokens": 100.0}  # fmt: skip
    assert tracker_metrics({"kind": "eval", "step": 2, "split": "holdout", "ce": 3.0}) == {
        "eval/ce": 3.0
    }


def test_a_missing_tracker_names_its_extra_before_anything_is_written(
    small_cache, student_json, tmp_path, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))  # fmt: skip
    result = _train(small_cache, student_json, tmp_path / "run", "--report-to", "wandb")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --report-to wandb needs the wandb package: pip install 'kdcache[wandb]'"
    )
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_refused_by_the_cli(small_cache, student_json, tmp_path):
    result = _train(small_cache, student_json, tmp_path / "run", "--report-to", "wanb")
    assert result.exit_code == 2 and "did you mean wandb?" in result.stderr


def test_default_none_writes_metrics_jsonl_only(small_cache, student_json, tmp_path):
    result = _train(small_cache, student_json, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "wandb").exists()


# -- each tracker, read back ----------------------------------------------------------------------


def test_tensorboard_event_files_hold_every_metric_at_its_step(small_cache, student_json, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = _train(small_cache, student_json, out, "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out))  # the event files are in the run directory
    events.Reload()
    expected = _jsonl_metrics(out)
    got = {(name, event.step): event.value for name in events.Tags()["scalars"]
           for event in events.Scalars(name)}  # fmt: skip
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert "settings" in "".join(events.Tags()["tensors"])  # the run's settings, once


def _wandb_records(run_dir: Path):
    """The protobuf records of an offline run's ``.wandb`` file (LevelDB log framing)."""
    from wandb.proto import wandb_internal_pb2

    raw = Path(glob.glob(str(run_dir / "run-*.wandb"))[0]).read_bytes()
    assert raw[:4] == b":W&B"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if kind == 0 and length == 0:
            break
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _finished_wandb_records(run_dir: Path) -> list:
    """The records once wandb's service process has written the run's exit record (it writes
    the file itself, and may still be flushing when ``finish()`` returns)."""
    records: list = []
    for _ in range(600):
        records = list(_wandb_records(run_dir))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        time.sleep(0.1)
    return records


def test_wandb_offline_run_holds_every_metric_and_the_settings(
    small_cache, student_json, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "kd-test")
    out = tmp_path / "run"
    result = _train(small_cache, student_json, out, "--report-to", "wandb", "--run-name", "r1")
    assert result.exit_code == 0, result.output
    (run_dir,) = [Path(p) for p in glob.glob(str(out / "wandb" / "offline-run-*"))]
    records = _finished_wandb_records(run_dir)
    got, config, run = {}, {}, None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}  # fmt: skip
            step = items.pop("_step")
            got.update({(k, step): v for k, v in items.items() if not k.startswith("_")})
        elif kind == "run":
            run = record.run
            config.update({u.key: json.loads(u.value_json) for u in run.config.update})
    assert run is not None and run.display_name == "r1" and run.project == "kd-test"
    expected = _jsonl_metrics(out)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    settings = _settings(out)
    assert {key: config[key] for key in settings} == settings


def test_mlflow_file_store_holds_every_metric_and_the_settings(
    small_cache, student_json, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset")  # (so that the end of the test
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # restores it): unset, kdcache allows the store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kd-test")
    out = tmp_path / "run"
    result = _train(small_cache, student_json, out, "--report-to", "mlflow", "--run-name", "r1")
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kd-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    expected = _jsonl_metrics(out)
    got = {(m.key, m.step): m.value for name in run.data.metrics
           for m in client.get_metric_history(run.info.run_id, name)}  # fmt: skip
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    assert run.data.params == {key: str(value) for key, value in _settings(out).items()}


def test_trackio_local_database_holds_every_metric_and_the_settings(
    small_cache, student_json, tmp_path, monkeypatch
):
    pytest.importorskip("trackio")
    import trackio.sqlite_storage as storage

    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp_path / "trackio")  # read at trackio's import
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "kd-test")
    out = tmp_path / "run"
    result = _train(small_cache, student_json, out, "--report-to", "trackio", "--run-name", "r1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "trackio" / "kd-test.db").is_file()
    logs = storage.SQLiteStorage.get_logs("kd-test", "r1")
    got = {(name, log["step"]): value for log in logs for name, value in log.items()
           if "/" in name and isinstance(value, int | float)}  # fmt: skip
    expected = _jsonl_metrics(out)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    config = storage.SQLiteStorage.get_run_config("kd-test", "r1")
    settings = _settings(out)
    assert {key: config[key] for key in settings} == settings


def _train_rank(rank: int, world_size: int, config):
    from kdcache.trainer import train

    return train(config).steps


def test_only_rank_zero_reports_under_two_gloo_ranks(small_cache, student_json, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdcache.trainer import TrainConfig
    from tests.test_distributed_build import run_ranks

    out = tmp_path / "run"
    config = TrainConfig(cache=str(small_cache), student=str(student_json), out=str(out), steps=2,
                         batch_size=2, progress=False, log_every=1, device="cpu",
                         report_to="tensorboard")  # fmt: skip
    assert run_ranks(_train_rank, 2, config) == [2, 2]
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # rank 0's writer only
    events = EventAccumulator(str(out))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {
        key[1]: value for key, value in _jsonl_metrics(out).items() if key[0] == "train/loss"
    }
    assert losses == pytest.approx(expected) and sorted(losses) == [1, 2]
