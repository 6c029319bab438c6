"""The small-cache encodings (issue 25): ``unique`` and ``q8`` (docs/FORMAT.md).

* ``unique`` stores each distinct tail sample once with its count: the reader returns exactly the
  arrays of ``exact`` (lossless), and the count-weighted estimator over the distinct ids (RS-KD's
  formula, ``bench/rskd.py``) equals the trainer's estimator over the repeated ids.
* ``q8`` quantizes the top-k log-probs (8-bit levels below the fp16 top-1: each entry within half
  its level step), the tail mass (fp16) and the sample log-probs (1/8-nat steps), keeps every
  id and every draw, and moves no gradient of the sample estimators.
* Both keep the draws unbiased: a build with ``--encoding q8`` stores draws that follow the
  teacher's tail (chi-square against the dense teacher).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench.rskd import sampled_kd_loss  # RS-KD's counts formula: an independent reference
from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.format.blocks import BlockCodec, stored_logprobs
from kdcache.cache.format.codecs import describe_encoding
from kdcache.cache.format.codecs.tail_counts import SAMPLE_Q8_STEP, unique_with_counts
from kdcache.cache.format.codecs.topk_compact import COMPACT_LEVELS
from kdcache.cache.format.distortion import position_kl, round_trip, storage_distortion
from kdcache.cache.records import SequenceRecord
from kdcache.cli.app import app
from kdcache.trainer.targets import SamplesTarget, TopkSamplesTarget
from kdcache.trainer.targets.base import LossOptions
from tests.test_tail_mode import _build, _chi2_quantile_999

V, K, S = 300, 6, 12


def _records(top_k: int = K, seed: int = 0, lengths=(7, 1, 0, 12)) -> list[SequenceRecord]:
    """Teacher-like rows: sorted top-k, tail draws from a peaked distribution (many repeats),
    one log-prob per id (as a teacher gives), some rows without tail (absent draws)."""
    rng = np.random.default_rng(seed)
    records = []
    for sequence_id, length in enumerate(lengths):
        logits = 3.0 * rng.standard_normal((length, V))
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        order = np.argsort(-log_p, axis=1)
        ids = order[:, :top_k]
        lp = np.take_along_axis(log_p, ids, 1)
        tail = 1 - np.exp(lp).sum(1)
        tail_p = np.exp(log_p)
        np.put_along_axis(tail_p, ids, 0.0, 1)
        tail_p /= tail_p.sum(1, keepdims=True)
        draws = (
            np.stack([rng.choice(V, S, p=row) for row in tail_p])
            if length
            else np.zeros((0, S), np.int64)
        )
        draw_lp = np.take_along_axis(log_p, draws, 1)
        if length > 3:  # a row without tail: every draw absent
            draws[2], draw_lp[2] = 0, -np.inf
        records.append(
            SequenceRecord(
                sequence_id=sequence_id,
                input_ids=rng.integers(0, V, length).astype(np.int32),
                topk_ids=ids.astype(np.int32),
                topk_logprobs=lp.astype(np.float32),
                tail_mass=tail.astype(np.float32),
                positions=np.arange(length, dtype=np.int32),
                tail_ids=draws.astype(np.int32),
                tail_logprobs=draw_lp.astype(np.float32),
            )
        )
    return records


def _sorted_draws(record):
    lp = record.tail_logprobs
    order = np.lexsort((lp, np.where(np.isfinite(lp), record.tail_ids, -1)), axis=1)
    return np.take_along_axis(record.tail_ids, order, 1), np.take_along_axis(lp, order, 1)


@pytest.mark.parametrize("top_k", [K, 0])
def test_unique_reads_back_exactly_what_exact_reads(top_k):
    records = _records(top_k)
    exact = round_trip(records, "exact", top_k, V, S)
    unique = round_trip(records, "unique", top_k, V, S)
    for a, b in zip(exact, unique, strict=True):
        for name in ("input_ids", "positions", "topk_ids", "topk_logprobs", "tail_mass"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        # the same draws, each row sorted by id (absent draws: id 0, -inf)
        for x, y in zip(_sorted_draws(a), _sorted_draws(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_unique_stores_fewer_bytes_when_draws_repeat():
    records = _records(0)
    sizes = {}
    for mode in ("exact", "unique"):
        batch = BlockCodec(mode, 0, V, tail_samples=S).encode(records)
        sizes[mode] = batch.nbytes
    assert sizes["unique"] < sizes["exact"], sizes


def test_unique_with_counts_matches_a_counter_per_row():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 7, (50, 9))
    codes = rng.integers(0, 3, (50, 9))
    present = rng.random((50, 9)) > 0.2
    per_row, flat_ids, flat_codes, counts = unique_with_counts(ids, codes, present)
    start = 0
    for row in range(50):
        expected = Counter(
            (int(i), int(c))
            for i, c, p in zip(ids[row], codes[row], present[row], strict=True)
            if p
        )
        got = {
            (int(i), int(c)): int(n)
            for i, c, n in zip(
                flat_ids[start : start + per_row[row]],
                flat_codes[start : start + per_row[row]],
                counts[start : start + per_row[row]],
                strict=True,
            )
        }
        assert got == dict(expected)
        assert list(got) == sorted(got)  # ascending ids (then codes)
        start += per_row[row]


def test_arbitrary_duplicates_keep_their_own_logprobs():
    """Two draws of one id with different log-probs (not a teacher's, but storable) stay apart."""
    record = _records(0, lengths=(3,))[0]
    record.tail_ids[0, :3] = 5
    record.tail_logprobs[0, :3] = [-1.0, -2.0, -1.0]
    (back,) = round_trip([record], "unique", 0, V, S)
    ids, lp = _sorted_draws(back)
    assert sorted(lp[0][ids[0] == 5].tolist()) == [-2.0, -1.0, -1.0]


def test_q8_keeps_ids_and_draws_and_bounds_each_value():
    records = _records(K)
    stored = round_trip(records, "q8", K, V, S)
    steps = np.diff(COMPACT_LEVELS)
    for before, after in zip(records, stored, strict=True):
        if before.num_positions == 0:
            continue
        # the reader's canonical order: match entries by id
        by_id_before = np.argsort(before.topk_ids, 1)
        by_id_after = np.argsort(after.topk_ids, 1)
        ids_before = np.take_along_axis(before.topk_ids, by_id_before, 1)
        np.testing.assert_array_equal(
            ids_before, np.take_along_axis(after.topk_ids, by_id_after, 1)
        )
        exact16 = np.take_along_axis(stored_logprobs(before.topk_logprobs), by_id_before, 1)
        got = np.take_along_axis(after.topk_logprobs, by_id_after, 1)
        top1 = exact16.max(1, keepdims=True)
        below = top1 - exact16  # nats below the fp16 top-1
        level = np.clip(np.searchsorted(COMPACT_LEVELS, below), 1, len(steps))
        half_step = steps[level - 1] / 2  # the step of the interval each entry falls in
        assert np.all(np.abs(got - exact16) <= half_step + 1e-5)
        np.testing.assert_array_equal(got.max(1), top1[:, 0])  # the top-1 is fp16-exact
        np.testing.assert_array_equal(after.tail_mass, before.tail_mass.astype(np.float16))
        a, b = _sorted_draws(before), _sorted_draws(after)
        np.testing.assert_array_equal(a[0], b[0])
        finite = np.isfinite(a[1])
        np.testing.assert_array_equal(finite, np.isfinite(b[1]))
        assert np.all(np.abs(a[1][finite] - b[1][finite]) <= SAMPLE_Q8_STEP / 2 + 1e-6)


def test_position_kl_equals_a_dense_reference():
    """KL(exact || stored) over top-k + bucket, renormalized, checked against a loop by hand."""
    records = _records(K, lengths=(6,))
    (stored,) = round_trip(records, "q8", K, V, S)
    (exact,) = records
    got = position_kl(exact, stored)
    for row in range(6):
        p = {int(i): float(np.exp(float(lp))) for i, lp in zip(exact.topk_ids[row],
                                                         exact.topk_logprobs[row], strict=True)}  # fmt: skip
        q = {int(i): float(np.exp(float(lp))) for i, lp in zip(stored.topk_ids[row],
                                                         stored.topk_logprobs[row], strict=True)}  # fmt: skip
        p["tail"], q["tail"] = float(exact.tail_mass[row]), float(stored.tail_mass[row])
        zp, zq = sum(p.values()), sum(q.values())
        want = sum(p[k] / zp * np.log((p[k] / zp) / (q[k] / zq)) for k in p if p[k] > 0)
        assert got[row] == pytest.approx(want, rel=1e-9, abs=1e-12)
    summary = storage_distortion(records, [stored])
    assert 0 < summary["mean_kl"] < 1e-3 and summary["max_sample_logprob_error"] <= 1 / 16
    exact_distortion = storage_distortion(records, round_trip(records, "exact", K, V, S))
    assert exact_distortion["max_kl"] < 1e-5  # fp16 rounding only
    assert storage_distortion(records, round_trip(records, "unique", K, V, S)) == exact_distortion


def _rows(record: SequenceRecord) -> dict[str, torch.Tensor]:
    keep = slice(0, record.num_positions)
    return {
        "topk_ids": torch.as_tensor(record.topk_ids[keep], dtype=torch.long),
        "topk_logprobs": torch.as_tensor(record.topk_logprobs[keep]),
        "tail_mass": torch.as_tensor(record.tail_mass[keep]),
        "tail_ids": torch.as_tensor(record.tail_ids[keep], dtype=torch.long),
        "tail_logprobs": torch.as_tensor(record.tail_logprobs[keep]),
    }


@pytest.mark.parametrize("mode", ["unique", "q8"])
def test_count_weighted_estimator_equals_the_one_over_repeated_ids(mode):
    """Sampled cache: RS-KD's sum_j (c_j / s) (log p_j - log q_j) over the distinct ids equals
    the trainer's mean over the s repeated draws, value and gradient."""
    (record,) = round_trip(_records(0, lengths=(12,)), mode, 0, V, S)
    rows = _rows(record)
    present = rows["tail_logprobs"] > -torch.inf
    per_row, ids, _, counts = unique_with_counts(
        rows["tail_ids"].numpy().astype(np.int64), np.zeros((12, S), np.int64), present.numpy()
    )
    width = int(per_row.max())
    distinct = torch.zeros(12, width, dtype=torch.long)
    count = torch.zeros(12, width)
    logprob = torch.full((12, width), 0.0)
    lookup = {(r, int(i)): float(lp) for r in range(12)
              for i, lp in zip(rows["tail_ids"][r], rows["tail_logprobs"][r], strict=True)}  # fmt: skip
    start = 0
    for r in range(12):
        for j in range(per_row[r]):
            distinct[r, j], count[r, j] = int(ids[start + j]), float(counts[start + j])
            logprob[r, j] = lookup[(r, int(ids[start + j]))]
        start += per_row[r]
    student = torch.randn(12, V, dtype=torch.float64, requires_grad=True)
    reference = sampled_kd_loss(student, distinct, count, logprob.double())
    target = SamplesTarget({"tail_samples": S, "top_k": 0})
    options = LossOptions(kind="fkl")
    got = target.loss(student, rows, options)
    torch.testing.assert_close(got.double(), reference, rtol=1e-6, atol=1e-6)  # float32 sums
    (want_grad,) = torch.autograd.grad(reference.sum(), student)
    _, grad = target.loss_and_grad(student.detach().float(), rows, torch.ones(12), options)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["fkl", "akl"])
def test_q8_sample_logprobs_move_no_gradient(kind):
    """The sample log-probs enter the loss value only: q8's 8-bit ones give the gradient of the
    same rows with fp16 sample log-probs, exactly (top-k + tail samples, the fused path)."""
    (q8,) = round_trip(_records(K, lengths=(12,)), "q8", K, V, S)
    rows = _rows(q8)
    fp16_samples = dict(rows, tail_logprobs=rows["tail_logprobs"] - 0.03)  # another value
    target = TopkSamplesTarget({"tail_samples": S, "top_k": K})
    logits = torch.randn(12, V)
    options = LossOptions(kind=kind)
    loss_a, grad_a = target.loss_and_grad(logits, rows, torch.ones(12), options)
    loss_b, grad_b = target.loss_and_grad(logits, fp16_samples, torch.ones(12), options)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
    assert not torch.equal(loss_a, loss_b)


@pytest.mark.parametrize("top_k", [8, 0])
def test_a_q8_build_stores_draws_that_follow_the_teacher(
    tiny_llama_dir, text_jsonl, tmp_path, top_k
):
    """--encoding q8: the draws are the teacher's (chi-square vs dense), the ids outside the
    top-k, the log-probs within their quantization bounds."""
    from transformers import AutoModelForCausalLM

    cache = _build(tiny_llama_dir, text_jsonl, tmp_path / "c", limit=12, top_k=top_k, mode="q8")
    assert cache.manifest["mode"] == "q8" and cache.manifest["format_version"] == 2
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    vocab = cache.manifest["vocab_size"]
    observed = torch.zeros(vocab, dtype=torch.float64)
    expected = torch.zeros(vocab, dtype=torch.float64)
    for record in cache.sequences("train"):
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(record.input_ids[None]).long()).logits[0]
        log_p = torch.log_softmax(logits.double(), -1)[record.positions]  # (M, V)
        ids = torch.as_tensor(record.tail_ids, dtype=torch.long)
        assert not (ids[:, :, None] == torch.as_tensor(record.topk_ids)[:, None, :]).any()
        np.testing.assert_allclose(record.tail_logprobs, log_p.gather(1, ids).numpy(),
                                   atol=SAMPLE_Q8_STEP / 2 + 1e-3, rtol=0)  # fmt: skip
        if top_k:
            exact = log_p.gather(1, torch.as_tensor(record.topk_ids).long()).numpy()
            assert np.abs(record.topk_logprobs - exact).max() < 0.5  # coarse levels far down
            top1 = np.abs(record.topk_logprobs.max(1) - exact.max(1))
            assert top1.max() < 2e-3  # the top-1 is stored as fp16
        tail_p = log_p.exp().scatter(1, torch.as_tensor(record.topk_ids, dtype=torch.long), 0.0)
        expected += (tail_p / tail_p.sum(-1, keepdim=True)).sum(0) * ids.shape[1]
        observed += torch.bincount(ids.reshape(-1), minlength=vocab).double()
    keep = expected > 5
    obs, exp = observed[keep], expected[keep]
    if not keep.all():  # the rest pooled into one bin
        obs = torch.cat([obs, observed[~keep].sum()[None]])
        exp = torch.cat([exp, expected[~keep].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < _chi2_quantile_999(len(obs) - 1), (chi2, len(obs))


def test_cli_encoding_flag_and_the_old_mode_flag(tiny_llama_dir, text_jsonl, tmp_path):
    from kdcache.cache.read.reader import open_cache

    base = ["build", "--teacher", str(tiny_llama_dir), "--data", str(text_jsonl), "--limit", "3",
            "--max-length", "32", "--top-k", "4", "--tail-samples", "4"]  # fmt: skip
    for flag, value in [("--encoding", "unique"), ("--mode", "q8"), ("--mode", "exact")]:
        out = tmp_path / f"{flag}-{value}"
        result = CliRunner().invoke(app, [*base, "--out", str(out), flag, value])
        assert result.exit_code == 0, result.output
        assert open_cache(out).manifest["mode"] == value
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "--mode-q8")])
    assert result.exit_code == 0 and describe_encoding("q8") in result.output.replace("\n", " ")
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "x"), "--encoding", "q4"])
    assert result.exit_code == 2 and "--mode must be one of exact, compact, q8, unique" in (
        result.output
    )


def test_compact_still_refuses_tail_samples_and_q8_accepts_them(tmp_path):
    from kdcache.cache.build.config import BuildConfig

    with pytest.raises(ConfigError, match="--mode compact cannot store tail samples"):
        BuildConfig(teacher="t", data="d", out=tmp_path, top_k=8, tail_samples=8, mode="compact")
    config = BuildConfig(teacher="t", data="d", out=tmp_path, top_k=8, tail_samples=8, mode="q8")
    assert (config.mode, config.top_k, config.tail_samples) == ("q8", 8, 8)


def test_a_q8_shard_with_other_levels_is_refused():
    codec = BlockCodec("q8", K, V, tail_samples=S)
    meta = dict(codec.schema_metadata())
    meta[b"levels"] = b"geometric:0.1:0.1:10.0"
    with pytest.raises(CacheError, match="uses q8 levels"):
        BlockCodec.from_schema_metadata(meta, "x.arrow")
