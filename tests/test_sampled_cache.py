"""Sampled caches (``kdcache build --top-k 0 --tail-samples N``): RS-KD stored end to end.

With no top-k entries the build draws N ids per position from the teacher's whole distribution
(its "tail" is everything, p_tail = 1), and ``topk_tail_kd_loss`` reduces to the RS-KD estimator
of Anshumann et al. (2025). The references here are independent formulas: ``sampled_kd_loss`` on
the unique ids with their counts, and the dense teacher.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench.rskd import sampled_kd_loss  # the RS-KD counts formula: an independent reference
from kdcache.cache.errors import ConfigError
from kdcache.cache.format.blocks import BlockCodec
from kdcache.cache.read.reader import open_cache
from kdcache.cache.records import SequenceRecord
from kdcache.cli.app import app
from kdcache.trainer.sampled import topk_tail_kd_loss
from tests import train_helpers as helpers

V, S = 40, 6


def _records(seed: int = 0) -> list[SequenceRecord]:
    rng = np.random.default_rng(seed)
    return [
        SequenceRecord(
            sequence_id=sequence_id,
            input_ids=rng.integers(0, V, length).astype(np.int32),
            topk_ids=np.zeros((length, 0), np.int32),
            topk_logprobs=np.zeros((length, 0), np.float32),
            tail_mass=np.ones(length, np.float32),
            positions=np.arange(length, dtype=np.int32),
            tail_ids=rng.integers(0, V, (length, S)).astype(np.int32),  # duplicates too
            tail_logprobs=(-1 - 4 * rng.random((length, S))).astype(np.float32),
        )
        for sequence_id, length in enumerate([5, 1, 9])
    ]


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_codec_round_trips_a_sampled_block(mode):
    codec = BlockCodec(mode, top_k=0, vocab_size=V, tail_samples=S)
    records = _records()
    for before, after in zip(records, codec.decode(codec.encode(records)), strict=True):
        assert after.topk_ids.shape == (before.num_positions, 0)
        assert after.topk_logprobs.shape == (before.num_positions, 0)
        np.testing.assert_array_equal(after.tail_mass, 1.0)
        order = np.argsort(before.tail_ids, axis=1, kind="stable")
        np.testing.assert_array_equal(after.tail_ids, np.take_along_axis(before.tail_ids, order, 1))
        rounded = np.take_along_axis(before.tail_logprobs, order, 1).astype(np.float16)
        np.testing.assert_array_equal(after.tail_logprobs, rounded.astype(np.float32))


def test_codec_refuses_no_entries_and_no_samples():
    with pytest.raises(ConfigError, match=r"top_k must be >= 1 \(or 0 with tail samples"):
        BlockCodec("exact", top_k=0, vocab_size=V)


def test_build_refuses_top_k_0_without_samples(tmp_path):
    from kdcache.cache.build.pipeline import BuildConfig

    with pytest.raises(ConfigError, match="--top-k 0 stores no teacher entries"):
        BuildConfig(teacher="t", data="d", out=tmp_path, top_k=0)
    args = ["build", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "c"), "--top-k", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--top-k must be >= 1 (got 0): --top-k 0 stores no teacher entries" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, tiny_llama_dir, text_jsonl):
    """A real `kdcache build --top-k 0 --tail-samples 24` cache of the tiny teacher."""
    from kdcache.cache.build.pipeline import BuildConfig, build_cache

    out = tmp_path_factory.mktemp("sampled") / "cache"
    build_cache(
        BuildConfig(
            teacher=str(tiny_llama_dir), data=str(text_jsonl), out=out, top_k=0, tail_samples=24,
            max_length=48, holdout=0.25, limit=16, progress=False,
        )
    )  # fmt: skip
    return out


def _counts(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int):
    """Unique ids with counts per row (the RS-KD layout) from (N, s) draws."""
    counts = torch.zeros(ids.shape[0], vocab, dtype=torch.int64)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    lp = torch.full((ids.shape[0], vocab), -float("inf"))
    lp.scatter_(1, ids, logprobs)
    return torch.arange(vocab).expand(ids.shape[0], vocab), counts, torch.where(counts > 0, lp, 0.0)


@pytest.mark.parametrize("chunked", [True, False])
def test_objective_on_a_sampled_cache_is_the_rskd_estimate(sampled_cache, chunked):
    """DistillObjective (fkl) on a sampled cache == sampled_kd_loss on unique ids + counts."""
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.objective import DistillObjective, batch_loss
    from kdcache.trainer.targets import LossOptions, SamplesTarget, target_for_cache

    cache = open_cache(sampled_cache)
    vocab = cache.manifest["vocab_size"]
    target = target_for_cache(cache.manifest)
    assert isinstance(target, SamplesTarget)
    batch = collate_records(list(cache.sequences("train"))[:3], target)
    assert "topk_ids" not in batch  # the samples target collates the samples alone
    model = helpers.tiny_llama(vocab)
    objective = DistillObjective(
        model, target, LossOptions(kind="fkl"), alpha=0.0, chunk_size=7, chunked=chunked
    )
    mask = batch["distill_mask"]
    loss = batch_loss(objective, batch, float(mask.sum()), 1.0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = sampled_kd_loss(
        logits[mask], *_counts(batch["tail_ids"][mask], batch["tail_logprobs"][mask], vocab)
    )
    torch.testing.assert_close(loss, reference.mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sampled_estimate_averages_to_the_dense_fkl():
    """k = 0: the mean of the estimate over many independent draws is the full-vocabulary FKL."""
    from kdcache.cache.extraction.tail_sampling import sample_tail, sequence_uniforms
    from kdcache.trainer.losses import dense_kd_loss

    gen = torch.Generator().manual_seed(3)
    teacher = 1.5 * torch.randn(2, V, generator=gen)
    student = torch.randn(2, V, generator=gen)
    log_p = torch.log_softmax(teacher, -1)
    empty = torch.zeros(2, 0, dtype=torch.long)
    uniforms = torch.from_numpy(sequence_uniforms(0, 7, 2, 20_000))
    ids, lp = sample_tail(log_p, empty, uniforms)  # 20,000 draws per row from p itself
    estimate = topk_tail_kd_loss(student, empty, empty.float(), torch.ones(2), ids, lp, kind="fkl")
    torch.testing.assert_close(estimate, dense_kd_loss(student, teacher, kind="fkl"), atol=0.03,
                               rtol=0.0)  # fmt: skip


@pytest.mark.parametrize("kind", ["rkl", "akl"])
def test_loss_refuses_rkl_and_akl_without_entries(kind):
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"with k = 0 \(samples only\) only fkl has an estimator"):
        topk_tail_kd_loss(
            torch.zeros(1, V), empty, empty.float(), torch.ones(1),
            torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), kind=kind,
        )  # fmt: skip


def test_train_refuses_akl_on_a_sampled_cache_before_writing(sampled_cache, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--cache", str(sampled_cache), "--student", "s", "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "--loss akl is not available with a samples teacher" in result.output
    assert "build with --top-k >= 1" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_train_and_eval_on_a_sampled_cache(sampled_cache, tiny_tokenizer, tmp_path):
    """kdcache train --loss fkl runs on a sampled cache and the full-teacher KL falls; kdcache
    eval reports the sampled FKL estimate (== the RS-KD reference) and no RKL / top-1."""
    student = helpers.student_config(tmp_path / "s.json", tiny_tokenizer)
    out = tmp_path / "run"
    args = ["train", "--cache", str(sampled_cache), "--student", str(student), "--out", str(out),
            "--loss", "fkl", "--steps", "30", "--batch-size", "4", "--lr", "1e-2", "--seed", "0",
            "--eval-every", "15"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output  # was 1: KeyError('rkl') printing the eval
    held_out = next(line for line in result.output.splitlines() if line.startswith("held-out:"))
    assert "fkl_unbiased " in held_out and "rkl_bucket n/a" in held_out and "top1 n/a" in held_out
    report = tmp_path / "eval.json"
    teacher_dir = json.loads((sampled_cache / "manifest.json").read_text())["teacher"]
    result = CliRunner().invoke(
        app,
        ["eval", "--cache", str(sampled_cache), "--student", str(out / "final"), "--student",
         str(student), "--json", str(report), "--teacher", str(teacher_dir)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(report.read_text())["students"]
    trained, untrained = metrics[str(out / "final")], metrics[str(student)]
    assert trained["rkl_bucket"] is None and trained["top1"] is None  # n/a: no top-k stored
    assert trained["fkl_bucket"] is None
    assert trained["fkl_full"] < 0.8 * untrained["fkl_full"], (trained, untrained)
    # the cached estimate tracks the full FKL it estimates (24 draws per position)
    assert abs(trained["fkl_unbiased"] - trained["fkl_full"]) < 0.15 * trained["fkl_full"]
    assert "n/a" in result.output  # the table shows what the cache cannot give


def test_inspect_a_sampled_cache(sampled_cache):
    """No top-k mass to summarize: the manifest and splits, and a line that says why."""
    from kdcache.cache.read.inspect import inspect_cache

    report = inspect_cache(sampled_cache)
    assert report.stats is None and report.splits[0].positions > 0
    result = CliRunner().invoke(app, ["inspect", str(sampled_cache)])
    assert result.exit_code == 0, result.output
    assert "a sampled cache (top-k 0) stores tail samples only" in result.output
