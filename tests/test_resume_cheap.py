"""Cheap resume: consumed shards are skipped by arithmetic (never opened), the resume state is freed.

The shard reader is instrumented (``LocalShards.load`` logs every shard it maps): a run resumed
at ~90% of a many-shard epoch opens only the shards of the windows it has not finished, and ends
with the weights of the uninterrupted run.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from kdcache.cache import open_cache
from kdcache.cache.storage.shard_sources import LocalShards
from kdcache.trainer import TrainConfig, train
from kdcache.trainer.checkpoint import load_training_state
from tests import train_helpers as helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, tiny_llama_dir, text_jsonl):
    """20 train sequences, about one per shard."""
    out = tmp_path_factory.mktemp("many") / "cache"
    texts = helpers.read_texts(text_jsonl)
    return helpers.make_cache(
        out, tiny_llama_dir, texts, num_train=20, num_holdout=2, max_shard_tokens=40
    )


@pytest.fixture(scope="module")
def student_json(tmp_path_factory, tiny_tokenizer):
    return helpers.student_config(tmp_path_factory.mktemp("student") / "s.json", tiny_tokenizer)


def _config(cache, student, out, **overrides) -> TrainConfig:
    settings = dict(
        cache=str(cache), student=str(student), out=str(out), loss="akl", batch_size=2,
        lr=3e-3, warmup_steps=0, progress=False, device="cpu", save_every=9,
        shuffle_window=2,
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def test_a_resume_at_90_percent_opens_only_the_shards_it_still_needs(
    many_shards, student_json, tmp_path, monkeypatch
):
    shards = open_cache(many_shards).shards("train")
    assert len(shards) >= 10
    out = tmp_path / "run"
    full = train(_config(many_shards, student_json, out))  # one epoch: 10 steps of 2 sequences
    assert full.steps == 10
    expected = load_file(str(out / "final" / "model.safetensors"))
    shutil.rmtree(out / "final")  # a crash in the last step: step-9 is the latest checkpoint

    state = load_training_state(out / "step-9")
    handed_out = state["data"][0]["sequences"][0]
    assert handed_out == 18
    opened: list[str] = []
    original = LocalShards.load

    def logged(self, info, verify=True):
        opened.append(info.name)
        return original(self, info, verify)

    monkeypatch.setattr(LocalShards, "load", logged)
    resumed = train(_config(many_shards, student_json, out, resume=True))
    assert resumed.resumed_from == 9 and resumed.steps == 10
    # only the last window (2 shards) can hold the 2 sequences left: nothing else is opened
    # (the tokenizer / vocab checks at start-up read no shard)
    assert 1 <= len(set(opened)) <= 2 < len(shards), opened
    got = load_file(str(out / "final" / "model.safetensors"))
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=0, atol=1e-6, msg=name)


def test_the_resume_state_is_not_kept_for_the_run(many_shards, student_json, tmp_path):
    from kdcache.trainer import distributed as dist_utils
    from kdcache.trainer.loop import _Run

    out = tmp_path / "run"
    train(_config(many_shards, student_json, out, steps=3, save_every=2))
    shutil.rmtree(out / "final")
    run = _Run(_config(many_shards, student_json, out, steps=3, save_every=2, resume=True),
               dist_utils.DistInfo())  # fmt: skip
    assert run.step == 2 and run.resume_state is None
    assert len(run.optimizer.state) > 0  # the optimizer itself did load its state


def test_a_resume_from_object_storage_downloads_only_the_shards_it_still_needs(
    s3, many_shards, tmp_path, monkeypatch
):
    """From s3:// with an empty read-through directory (a new machine): the resumed partition
    downloads the shards of its last window only, and hands out the uninterrupted batches."""
    from kdcache.cache.storage.shard_sources import RemoteShards
    from kdcache.cache.transfer import push_cache
    from kdcache.trainer.data import CacheDataset

    url = f"s3://{s3.bucket}/many"
    push_cache(many_shards, url, storage_options=s3.options)

    def dataset(cache_dir):
        remote = open_cache(url, storage_options=s3.options, cache_dir=cache_dir)
        return CacheDataset(remote, batch_size=2, seed=1, shuffle_window=2)

    expected = [b["sequence_ids"].tolist() for b in dataset(tmp_path / "a").epoch_batches()]
    first = dataset(tmp_path / "b")
    stream = first.epoch_batches()
    head = [next(stream)["sequence_ids"].tolist() for _ in range(len(expected) - 1)]
    state = first.state_dict()
    stream.close()
    downloaded: list[str] = []
    original = RemoteShards.download

    def logged(self, info, final):
        downloaded.append(info.name)
        return original(self, info, final)

    monkeypatch.setattr(RemoteShards, "download", logged)
    resumed = dataset(tmp_path / "fresh")  # nothing downloaded yet on this "machine"
    resumed.load_state_dict(state)
    tail = [b["sequence_ids"].tolist() for b in resumed.epoch_batches()]
    assert head + tail == expected
    assert 1 <= len(downloaded) <= 2 < len(open_cache(many_shards).shards("train")), downloaded


def test_a_checkpoint_from_before_this_release_still_resumes(many_shards, student_json, tmp_path):
    """run.json without the new fields, a step checkpoint whose data cursor has no ``order`` or
    ``sequences`` and a final/ with the optimizer: the resume continues (in the buffer order
    the run was started in) and finishes."""
    import json

    out = tmp_path / "run"
    old = dict(steps=4, save_every=2, shuffle_window=4)  # what an old run.json's absence means
    train(_config(many_shards, student_json, out, **old))
    shutil.rmtree(out / "final")
    run = json.loads((out / "run.json").read_text())
    for name in ("shuffle_window", "save_every_minutes", "save_total_limit", "export_dtype",
                 "dist_timeout", "fsdp"):  # fmt: skip
        run.pop(name)
    (out / "run.json").write_text(json.dumps(run))
    state = torch.load(out / "step-2" / "trainer_state.pt", weights_only=False)
    for cursor in state["data"]:
        for name in ("order", "shuffle_window", "sequences"):
            cursor.pop(name)
    torch.save(state, out / "step-2" / "trainer_state.pt")
    resumed = train(_config(many_shards, student_json, out, resume=True, **old))
    assert resumed.resumed_from == 2 and resumed.steps == 4
    cursor = load_training_state(out / "final")["data"][0]
    assert cursor["order"] == "buffer"  # the run keeps the order it was started in
