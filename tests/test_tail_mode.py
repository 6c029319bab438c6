"""The topk+tail mode's device sampler: draws follow the teacher's tail, deterministic per sequence."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from kdcache.cache.extraction.tail_sampling import sample_tail, sequence_uniforms
from kdcache.trainer.sampled import topk_tail_kd_loss
from tests import train_helpers as helpers

V, K = 40, 5


def _chi2_quantile_999(df: int) -> float:
    """The 0.999 quantile of the chi-square distribution (no scipy): bisect its survival function,
    sf(x) = Q(df / 2, x / 2), the regularized upper incomplete gamma function."""
    lo, hi = 0.0, float(df) + 40.0 * math.sqrt(2.0 * df) + 100.0
    a = torch.tensor(df / 2.0, dtype=torch.float64)
    for _ in range(200):
        mid = (lo + hi) / 2.0
        sf = torch.special.gammaincc(a, torch.tensor(mid / 2.0, dtype=torch.float64)).item()
        lo, hi = (mid, hi) if sf > 1e-3 else (lo, mid)
    return (lo + hi) / 2.0


def teacher(seed: int = 0, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, V) teacher log-probs with a real tail, and their top-K ids."""
    gen = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(1.5 * torch.randn(rows, V, generator=gen), -1)
    return log_probs, log_probs.topk(K, -1).indices


def test_draws_follow_the_teacher_tail_distribution():
    """Chi-square of 40,000 draws against p_j / p_tail over the tail ids (dense reference)."""
    log_probs, topk_ids = teacher()
    uniforms = torch.from_numpy(sequence_uniforms(0, 1, 1, 40_000))
    ids, logprobs = sample_tail(log_probs, topk_ids, uniforms)
    p = log_probs[0].double().exp()
    tail_ids = [j for j in range(V) if j not in set(topk_ids[0].tolist())]
    expected = p[tail_ids] / p[tail_ids].sum() * ids.numel()
    observed = torch.bincount(ids[0], minlength=V).double()
    assert observed[topk_ids[0]].sum() == 0  # never a top-k id
    chi2 = float(((observed[tail_ids] - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_quantile_999(len(tail_ids) - 1), chi2
    torch.testing.assert_close(logprobs[0], log_probs[0, ids[0]])  # the teacher's own log p_j


@pytest.mark.parametrize("vocab", [40, 256, 1000, 1027])
def test_two_level_search_equals_one_level_float64_inverse_cdf(vocab):
    """The block-wise sampler picks the id of a plain float64 inverse CDF over the whole row
    (up to rare rounding at a boundary), also when V is not a multiple of the block."""
    gen = torch.Generator().manual_seed(vocab)
    log_probs = torch.log_softmax(3 * torch.randn(64, vocab, generator=gen), -1)
    log_probs[:, ::7] = -math.inf  # zero-probability runs inside blocks
    log_probs = torch.log_softmax(log_probs, -1)
    topk_ids = log_probs.topk(5, -1).indices
    uniforms = torch.from_numpy(sequence_uniforms(1, vocab, 64, 200))
    probs = log_probs.double().exp().scatter(1, topk_ids, 0.0)
    cdf = probs.cumsum(-1)
    reference = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)
    ids, _ = sample_tail(log_probs, topk_ids, uniforms)
    assert (ids != reference).float().mean() < 1e-3
    assert (probs.gather(1, ids) > 0).all()  # never a top-k id, never a zero-probability id


def test_same_samples_whatever_the_batch():
    """Rows of a sequence get the same draws alone, inside a bigger batch, or as a prefix."""
    log_probs, topk_ids = teacher(1, rows=6)
    alone = sample_tail(
        log_probs[:2], topk_ids[:2], torch.from_numpy(sequence_uniforms(3, 9, 2, 8))
    )
    uniforms = np.concatenate([sequence_uniforms(3, 9, 2, 8), sequence_uniforms(3, 10, 4, 8)])
    batched = sample_tail(log_probs, topk_ids, torch.from_numpy(uniforms))
    assert torch.equal(alone[0], batched[0][:2]) and torch.equal(alone[1], batched[1][:2])
    np.testing.assert_array_equal(sequence_uniforms(3, 9, 5, 8)[:2], sequence_uniforms(3, 9, 2, 8))
    assert not np.array_equal(sequence_uniforms(3, 9, 2, 8), sequence_uniforms(3, 10, 2, 8))
    assert not np.array_equal(sequence_uniforms(3, 9, 2, 8), sequence_uniforms(4, 9, 2, 8))


def test_rows_without_tail_are_absent():
    log_probs = torch.log_softmax(torch.randn(2, 6), -1)
    ids, logprobs = sample_tail(log_probs, torch.arange(6).expand(2, 6), torch.rand(2, 3))
    assert torch.equal(ids, torch.zeros(2, 3, dtype=torch.int64))
    assert torch.isneginf(logprobs).all()


def test_fkl_on_the_samples_is_unbiased():
    """Mean over 4,000 sequences' draws of the topk+tail FKL == the dense FKL (5 std errors)."""
    log_probs, topk_ids = teacher(2)
    student = torch.randn(1, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reps, samples = 4000, 4
    uniforms = np.concatenate([sequence_uniforms(0, i, 1, samples) for i in range(reps)])
    ids, logprobs = sample_tail(
        log_probs.expand(reps, V), topk_ids.expand(reps, K), torch.from_numpy(uniforms)
    )
    topk_lp = log_probs.gather(1, topk_ids)
    tail = 1 - topk_lp.exp().sum(-1)
    losses = topk_tail_kd_loss(
        student.expand(reps, V), topk_ids.expand(reps, K), topk_lp.expand(reps, K),
        tail.expand(reps), ids, logprobs, kind="fkl",
    )  # fmt: skip
    p = log_probs.double().exp()
    dense = float((p * (log_probs.double() - torch.log_softmax(student, -1))).sum())
    error = float(losses.std()) / math.sqrt(reps)
    assert abs(float(losses.mean()) - dense) < 5 * error, (float(losses.mean()), dense, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_dtype_does_not_matter(dtype):
    log_probs, topk_ids = teacher(3, rows=4)
    uniforms = torch.from_numpy(sequence_uniforms(0, 0, 4, 16))
    a = sample_tail(log_probs, topk_ids, uniforms.to(dtype))[0]
    b = sample_tail(log_probs, topk_ids, uniforms)[0]
    assert (a != b).float().mean() < 0.05  # float32 rounding may move a rare boundary draw


def _records(s: int, seed: int = 0):
    """Three records (5, 1 and 9 positions) with top-K rows and s tail samples each."""
    from kdcache.cache.records import SequenceRecord

    rng = np.random.default_rng(seed)
    records = []
    for sequence_id, length in enumerate([5, 1, 9]):
        lp = np.sort(np.log(rng.dirichlet(np.ones(V), size=length)), axis=1)[:, ::-1][:, :K]
        ids = np.stack([rng.permutation(V)[:K] for _ in range(length)])
        records.append(
            SequenceRecord(
                sequence_id=sequence_id,
                input_ids=rng.integers(0, V, length).astype(np.int32),
                topk_ids=ids.astype(np.int32),
                topk_logprobs=np.ascontiguousarray(lp, dtype=np.float32),
                tail_mass=(1 - np.exp(lp).sum(1)).astype(np.float32),
                positions=np.arange(length, dtype=np.int32),
                tail_ids=rng.integers(0, V, (length, s)).astype(np.int32),  # duplicates too
                tail_logprobs=(-3 - 5 * rng.random((length, s))).astype(np.float32),
            )
        )
    return records


def _row_multisets(ids: np.ndarray, logprobs: np.ndarray) -> list[list[tuple[int, float]]]:
    return [
        sorted(zip(i.tolist(), lp.tolist(), strict=True))
        for i, lp in zip(ids, logprobs, strict=True)
    ]


def test_tail_samples_round_trip_through_shards(tmp_path):
    """ShardWriter -> open_cache gives back each row's samples (as a multiset; fp16 log-probs)."""
    from kdcache.cache.format.manifest import shard_summary, write_manifest
    from kdcache.cache.format.shards import ShardWriter, list_complete_shards
    from kdcache.cache.read.reader import open_cache

    records = _records(s=6)
    with ShardWriter(tmp_path, "train", top_k=K, vocab_size=V, tail_samples=6) as writer:
        for record in records:
            writer.write(record)
    manifest = {
        "format_version": 1, "teacher": "t", "vocab_size": V, "top_k": K, "temperature": 1.0,
        "tokenizer_fingerprint": "x", "num_sequences": 3, "num_tokens": 15, "tail_samples": 6,
        **shard_summary(list_complete_shards(tmp_path)),
    }  # fmt: skip
    write_manifest(tmp_path, manifest)
    read = list(open_cache(tmp_path).sequences("train"))
    assert [r.sequence_id for r in read] == [0, 1, 2]
    for before, after in zip(records, read, strict=True):
        assert after.tail_ids.dtype == np.int32 and after.tail_logprobs.dtype == np.float32
        rounded = before.tail_logprobs.astype(np.float16).astype(np.float32)
        assert _row_multisets(after.tail_ids, after.tail_logprobs) == _row_multisets(
            before.tail_ids, rounded
        )
        np.testing.assert_array_equal(after.input_ids, before.input_ids)


def test_a_cache_without_tail_samples_reads_none(tmp_path):
    from kdcache.cache.format.blocks import BlockCodec

    plain = [dataclasses.replace(r, tail_ids=None, tail_logprobs=None) for r in _records(s=2)]
    codec = BlockCodec("exact", top_k=K, vocab_size=V)
    assert all(
        r.tail_ids is None and r.tail_logprobs is None for r in codec.decode(codec.encode(plain))
    )


def test_writer_refuses_missing_or_unexpected_tail_samples(tmp_path):
    from kdcache.cache.errors import ConfigError
    from kdcache.cache.format.shards import ShardWriter

    record = _records(s=4)[0]
    plain = ShardWriter(tmp_path / "a", "train", top_k=K, vocab_size=V)
    with pytest.raises(ConfigError, match="tail samples but the writer stores none"):
        plain.write(record)
    plain.abort()
    sampled = ShardWriter(tmp_path / "b", "train", top_k=K, vocab_size=V, tail_samples=6)
    with pytest.raises(ConfigError, match=r"expected tail_ids and tail_logprobs \(M, 6\)"):
        sampled.write(record)
    sampled.abort()


def _build(teacher_dir, data, out, **settings):
    from kdcache.cache.build.pipeline import BuildConfig, build_cache

    # exact storage unless a test asks otherwise (the stored values are compared at fp16)
    config = dict(top_k=8, max_length=48, holdout=0.0, progress=False, tail_samples=16,
                  mode="exact")  # fmt: skip
    config.update(settings)
    build_cache(BuildConfig(teacher=str(teacher_dir), data=str(data), out=out, **config))
    from kdcache.cache.read.reader import open_cache

    return open_cache(out)


@pytest.mark.parametrize("top_k", [8, 0])
def test_build_stores_tail_samples_that_follow_the_teacher(
    tiny_llama_dir, text_jsonl, tmp_path, top_k
):
    """kdcache build --tail-samples: draws outside the top-k, the teacher's own log p_j, and
    (aggregated over every position) the frequencies of p_j / p_tail (chi-square vs dense).
    With --top-k 0 (a sampled cache) the "tail" is the whole distribution and p_tail is 1."""
    from transformers import AutoModelForCausalLM

    cache = _build(tiny_llama_dir, text_jsonl, tmp_path / "cache", limit=12, top_k=top_k)
    assert cache.manifest["tail_samples"] == 16 and cache.manifest["top_k"] == top_k
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    vocab = cache.manifest["vocab_size"]
    observed, expected = (
        torch.zeros(vocab, dtype=torch.float64),
        torch.zeros(vocab, dtype=torch.float64),
    )
    for record in cache.sequences("train"):
        with torch.no_grad():
            logits = model(
                input_ids=torch.as_tensor(record.input_ids[None], dtype=torch.long)
            ).logits[0]
        log_p = torch.log_softmax(logits.double(), -1)[record.positions]  # (M, V) dense reference
        ids = torch.as_tensor(record.tail_ids, dtype=torch.long)  # (M, s)
        assert record.topk_ids.shape == (len(record.positions), top_k)
        assert not (ids[:, :, None] == torch.as_tensor(record.topk_ids)[:, None, :]).any()
        if top_k == 0:
            np.testing.assert_array_equal(record.tail_mass, 1.0)
        np.testing.assert_allclose(
            record.tail_logprobs, log_p.gather(1, ids).numpy(), atol=2e-3, rtol=1e-3
        )  # fp16 storage
        tail_p = log_p.exp().scatter(1, torch.as_tensor(record.topk_ids, dtype=torch.long), 0.0)
        expected += (tail_p / tail_p.sum(-1, keepdim=True)).sum(0) * ids.shape[1]
        observed += torch.bincount(ids.reshape(-1), minlength=vocab).double()
    keep = expected > 5  # Pearson's rule of thumb; the rest pooled into one bin
    obs, exp = observed[keep], expected[keep]
    if not keep.all():
        obs = torch.cat([obs, observed[~keep].sum()[None]])
        exp = torch.cat([exp, expected[~keep].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < _chi2_quantile_999(len(obs) - 1), (chi2, len(obs))


def test_tail_samples_leave_the_top_k_unchanged(tiny_llama_dir, text_jsonl, tmp_path):
    """The fused top-k + sampling pass stores the same top-k rows as a build without samples."""
    with_samples = _build(tiny_llama_dir, text_jsonl, tmp_path / "a", limit=6)
    plain = _build(tiny_llama_dir, text_jsonl, tmp_path / "b", limit=6, tail_samples=0)
    for a, b in zip(with_samples.sequences("train"), plain.sequences("train"), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        np.testing.assert_array_equal(a.tail_mass, b.tail_mass)
        assert a.tail_ids is not None and b.tail_ids is None


def test_build_samples_do_not_depend_on_batching(tiny_llama_dir, text_jsonl, tmp_path):
    """Per-sequence seeding: other batch sizes give the same samples (resume / ranks alike)."""
    one = _build(tiny_llama_dir, text_jsonl, tmp_path / "a", batch_tokens=4096, limit=6)
    two = _build(tiny_llama_dir, text_jsonl, tmp_path / "b", batch_tokens=64, limit=6)
    for a, b in zip(one.sequences("train"), two.sequences("train"), strict=True):
        assert a.sequence_id == b.sequence_id
        np.testing.assert_array_equal(np.sort(a.tail_ids, 1), np.sort(b.tail_ids, 1))


@pytest.mark.parametrize(
    ("given", "resolved"),
    [
        ({}, (8, 8)),  # the default: topk+tail, q8 (docs/QUALITY.md "Small caches")
        ({"top_k": 64}, (64, 0)),  # --top-k alone: a plain top-k cache, as before
        ({"tail_samples": 16}, (8, 16)),
        ({"top_k": 0, "tail_samples": 32}, (0, 32)),  # a sampled cache
        ({"top_k": 16, "tail_samples": 0}, (16, 0)),
    ],
)
def test_build_defaults(tmp_path, given, resolved):
    from kdcache.cache.build.pipeline import BuildConfig

    config = BuildConfig(teacher="t", data="d", out=tmp_path, **given)
    assert (config.top_k, config.tail_samples) == resolved
    assert config.mode == "q8"  # the default encoding (issue 25)


def test_cli_build_default_is_topk_tail_and_demo_stays_top64(tiny_llama_dir, text_jsonl, tmp_path):
    from typer.testing import CliRunner

    from kdcache.cache.read.reader import open_cache
    from kdcache.cli.app import app
    from kdcache.demo import DEMO_BUILD_SETTINGS

    out = tmp_path / "c"
    args = ["build", "--teacher", str(tiny_llama_dir), "--data", str(text_jsonl), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--limit", "4", "--max-length", "32"])
    assert result.exit_code == 0, result.output
    manifest = open_cache(out).manifest
    assert (manifest["top_k"], manifest["tail_samples"], manifest["mode"]) == (8, 8, "q8")
    assert DEMO_BUILD_SETTINGS["top_k"] == 64  # the demo passes its k: a plain top-64 cache


def test_build_refuses_bad_tail_samples(tmp_path):
    from kdcache.cache.build.pipeline import BuildConfig
    from kdcache.cache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--tail-samples must be in \[0, 255\]"):
        BuildConfig(teacher="t", data="d", out=tmp_path, tail_samples=-1)


def test_cli_build_refuses_bad_tail_samples(tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli.app import app

    args = ["build", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "c")]
    result = CliRunner().invoke(app, [*args, "--tail-samples", "300"])
    assert result.exit_code == 2
    assert "--tail-samples must be in [0, 255]" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def tail_cache(tmp_path_factory, tiny_llama_dir, text_jsonl):
    """A real `kdcache build --tail-samples 8` cache of the tiny teacher (with a holdout)."""
    out = tmp_path_factory.mktemp("tail") / "cache"
    _build(tiny_llama_dir, text_jsonl, out, limit=16, tail_samples=8, holdout=0.25)
    return out


def test_collate_pads_tail_samples(tail_cache):
    from kdcache.cache.read.reader import open_cache
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.targets import target_for_cache

    cache = open_cache(tail_cache)
    records = list(cache.sequences("train"))[:3]
    batch = collate_records(records, target_for_cache(cache.manifest))
    b, t = batch["input_ids"].shape
    assert batch["tail_ids"].shape == (b, t, 8) and batch["tail_logprobs"].shape == (b, t, 8)
    for row, record in enumerate(records):
        got = batch["tail_ids"][row, record.positions].numpy()
        np.testing.assert_array_equal(got, record.tail_ids)
        padding = ~batch["distill_mask"][row]
        assert torch.isneginf(batch["tail_logprobs"][row][padding]).all()


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("kind", ["fkl", "akl"])
def test_objective_on_tail_samples_is_the_reference_mean(tail_cache, kind, chunked):
    """DistillObjective with tail samples == mean of topk_tail_kd_loss over full logits (+ CE)."""
    from kdcache.cache.read.reader import open_cache
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.objective import DistillObjective, batch_loss
    from kdcache.trainer.targets import LossOptions, target_for_cache

    cache = open_cache(tail_cache)
    target = target_for_cache(cache.manifest)
    batch = collate_records(list(cache.sequences("train"))[:3], target)
    model = helpers.tiny_llama(384)
    options = LossOptions(kind=kind, mu=0.5, temperature=1.0)
    objective = DistillObjective(model, target, options, alpha=0.25, chunk_size=7, chunked=chunked)
    mask, labelled = batch["distill_mask"], batch["labels"] != -100
    loss = batch_loss(objective, batch, float(mask.sum()), float(labelled.sum()))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd = topk_tail_kd_loss(
        logits[mask], batch["topk_ids"][mask], batch["topk_logprobs"][mask],
        batch["tail_mass"][mask], batch["tail_ids"][mask], batch["tail_logprobs"][mask], kind=kind,
    )  # fmt: skip
    ce = torch.nn.functional.cross_entropy(logits[labelled], batch["labels"][labelled])
    torch.testing.assert_close(loss, 0.75 * kd.mean() + 0.25 * ce, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_divergences_without_a_sample_estimator_use_the_bucket(tail_cache):
    """--loss js on a topk+tail cache: the plain top-k + bucket loss (samples ignored)."""
    from kdcache.cache.read.reader import open_cache
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.losses import sparse_kd_loss
    from kdcache.trainer.objective import DistillObjective, batch_loss
    from kdcache.trainer.targets import LossOptions, target_for_cache

    cache = open_cache(tail_cache)
    target = target_for_cache(cache.manifest)
    batch = collate_records(list(cache.sequences("train"))[:3], target)
    model = helpers.tiny_llama(384)
    objective = DistillObjective(model, target, LossOptions(kind="js"), alpha=0.0, chunk_size=7,
                                 chunked=False)  # fmt: skip
    mask = batch["distill_mask"]
    loss = batch_loss(objective, batch, float(mask.sum()), 1.0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = sparse_kd_loss(
        logits[mask], batch["topk_ids"][mask], batch["topk_logprobs"][mask],
        batch["tail_mass"][mask], kind="js",
    )  # fmt: skip
    torch.testing.assert_close(loss, reference.mean(), atol=1e-5, rtol=1e-5)


def test_train_on_a_tail_cache_lowers_heldout_kl(tail_cache, tiny_tokenizer, tmp_path):
    """kdcache train on a topk+tail cache (FKL, chunked path) runs and the held-out KL falls."""
    from transformers import AutoModelForCausalLM

    from kdcache.cache.read.reader import open_cache
    from kdcache.trainer.config import TrainConfig
    from kdcache.trainer.evaluation import evaluate_model
    from kdcache.trainer.loop import train
    from kdcache.trainer.student import load_student_model

    student = helpers.student_config(tmp_path / "s.json", tiny_tokenizer)
    cache = open_cache(tail_cache)

    def heldout_fkl(model) -> float:
        return evaluate_model(model, cache, split="holdout", temperature=1.0)["fkl_bucket"]

    before = heldout_fkl(load_student_model(str(student), seed=0)[0])
    config = TrainConfig(cache=str(tail_cache), student=str(student), out=str(tmp_path / "run"),
                         loss="fkl", steps=30, batch_size=4, lr=1e-2, progress=False, seed=0)  # fmt: skip
    result = train(config)
    after = heldout_fkl(AutoModelForCausalLM.from_pretrained(result.final))
    assert math.isfinite(result.loss) and after < 0.8 * before, (before, after)
