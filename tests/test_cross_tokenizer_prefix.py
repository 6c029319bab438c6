"""The prefix map and the inside positions, against dense references written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.cache.errors import ConfigError
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.cross_tokenizer.alignment import CrossTokenizer
from kdcache.trainer.cross_tokenizer.batches import (
    AlignmentStats,
    collate_student_records,
    student_record,
)
from kdcache.trainer.cross_tokenizer.inside import inside_rows
from kdcache.trainer.cross_tokenizer.loss import (
    CrossTokenizerLoss,
    cross_tokenizer_kd_loss,
    cross_tokenizer_loss_and_grad,
)
from kdcache.trainer.cross_tokenizer.mapping import map_teacher_rows, merge_duplicate_ids
from tests import xtok_helpers as hand

# Teacher a b c Ġ ab abc <eos>; student Ġ c b a bc <eos>. By hand: 'ab' -> student a, b and
# 'abc' -> student a, bc; the first student token of both is 'a' (student id 3).
PREFIX_TO_STUDENT = [3, 2, 1, 0, 3, 3, 5]


def _cross(vocab_map: str = "prefix", distill_inside: bool = True) -> CrossTokenizer:
    return CrossTokenizer(hand.teacher_tokenizer(), hand.student_tokenizer(), vocab_map,
                          distill_inside)  # fmt: skip


def _dense_reference(dense: np.ndarray, ids: np.ndarray, mapping: list[int]):
    """By hand over a dense teacher row: student probabilities (6,) and the bucket."""
    student = np.zeros(6)
    bucket = 1.0
    for teacher_id in ids:
        if mapping[teacher_id] >= 0:
            student[mapping[teacher_id]] += dense[teacher_id]
            bucket -= dense[teacher_id]
    return student, bucket


def test_the_prefix_map_by_hand():
    cross = _cross()
    assert cross.exact_to_student.tolist() == hand.TEACHER_TO_STUDENT
    assert cross.teacher_to_student.tolist() == PREFIX_TO_STUDENT
    assert _cross("exact").teacher_to_student.tolist() == hand.TEACHER_TO_STUDENT
    assert cross.first_student_token(b"bca") == 4  # 'bc' 'a'
    assert cross.first_student_token(b"") == -1
    assert "prefix map" in cross.summary() and "exact match" in cross.summary()


@pytest.mark.parametrize("vocab_map", ["exact", "prefix"])
@pytest.mark.parametrize("top_k", [3, 7])
def test_mapping_against_a_dense_reference(vocab_map: str, top_k: int):
    rng = np.random.default_rng(top_k)
    dense = rng.dirichlet(np.full(7, 0.7), size=4)  # (4, 7)
    ids = np.argsort(-dense, axis=-1)[:, :top_k]
    top = np.take_along_axis(dense, ids, -1)
    cross = _cross(vocab_map)
    mapped = map_teacher_rows(ids, np.log(top).astype(np.float32),
                              (1 - top.sum(-1)).astype(np.float32),
                              cross.teacher_to_student, cross.exact_to_student)  # fmt: skip
    mapping = PREFIX_TO_STUDENT if vocab_map == "prefix" else hand.TEACHER_TO_STUDENT
    for row in range(4):
        student, bucket = _dense_reference(dense[row], ids[row], mapping)
        got = np.zeros(6)
        present = np.isfinite(mapped.topk_logprobs[row])
        assert len(set(mapped.topk_ids[row][present].tolist())) == present.sum()  # distinct
        got[mapped.topk_ids[row][present]] = np.exp(mapped.topk_logprobs[row][present])
        np.testing.assert_allclose(got, student, atol=1e-6)
        np.testing.assert_allclose(mapped.tail_mass[row], bucket, atol=1e-6)
        exact = sum(dense[row, i] for i in ids[row] if hand.TEACHER_TO_STUDENT[i] >= 0)
        np.testing.assert_allclose(mapped.matched_mass[row], exact, atol=1e-6)
        assert np.all(np.diff(got[mapped.topk_ids[row][present]]) <= 1e-7)  # descending


def test_merge_duplicate_ids_by_hand():
    ids = np.array([[3, 1, 3, 0], [2, 2, 2, 2]])
    probs = np.array([[0.1, 0.2, 0.3, 0.0], [0.1, 0.1, 0.1, 0.0]])
    merged_ids, merged = merge_duplicate_ids(ids, probs)
    assert merged_ids.tolist() == [[3, 1, 0, 0], [2, 0, 0, 0]]
    np.testing.assert_allclose(merged, [[0.4, 0.2, 0, 0], [0.3, 0, 0, 0]])


def test_inside_positions_by_hand():
    cross = _cross()
    # teacher: abc | Ġ | abc  ->  ends 3 4 7;  student: a bc Ġ a bc  ->  ends 1 3 4 5 7
    aligned = cross.align(np.array([5, 3, 5]), np.arange(3))
    assert aligned.positions.tolist() == [1, 2, 4]
    # student position 3 ends at 4 + 1: inside the second 'abc', enclosing teacher position 1,
    # 'a' emitted; student position 0 is inside the first 'abc', which no position predicts
    assert aligned.inside_positions.tolist() == [3]
    assert aligned.inside_rows.tolist() == [1]
    assert aligned.inside_emitted == (b"a",)
    assert aligned.inside_unstored == 1
    off = _cross(distill_inside=False).align(np.array([5, 3, 5]), np.arange(3))
    assert off.inside_positions.tolist() == [] and off.inside_unstored == 0


def test_inside_target_against_a_dense_reference():
    # enclosing row: abc 0.4, ab 0.3, a 0.1, Ġ 0.05 (tail 0.15); emitted 'a'.
    # By hand: consistent and longer than 'a': abc -> rest 'bc' -> student bc (4), ab -> rest
    # 'b' -> student b (2); renormalised over 0.7 and scaled to 1 - tail: bc 0.85 * 4/7,
    # b 0.85 * 3/7, bucket 0.15.
    ids = np.array([[5, 4, 0, 3], [5, 4, 0, 3]])
    logprobs = np.log(np.array([[0.4, 0.3, 0.1, 0.05]] * 2, dtype=np.float32))
    cross = _cross()
    tail = np.array([0.15, 0.15], dtype=np.float32)
    rows = inside_rows(ids, logprobs, tail, [b"a", b"c"], cross.teacher_pieces,
                       cross.first_student_token)  # fmt: skip
    dense = np.zeros(6)
    dense[rows.topk_ids[0][np.isfinite(rows.topk_logprobs[0])]] = np.exp(
        rows.topk_logprobs[0][np.isfinite(rows.topk_logprobs[0])]
    )
    np.testing.assert_allclose(dense, [0, 0, 0.85 * 3 / 7, 0, 0.85 * 4 / 7, 0], atol=1e-6)
    np.testing.assert_allclose(rows.tail_mass[0], 0.15, atol=1e-6)
    np.testing.assert_allclose(rows.consistent_mass, [0.7, 0.0], atol=1e-6)
    assert rows.has_target.tolist() == [True, False]  # nothing cached starts with 'c'


def _record(teacher_ids: list[int], rows: list[list[float]]) -> SequenceRecord:
    """A record whose every row has top-k ids abc, ab, a, Ġ with the given probabilities."""
    probs = np.array(rows, dtype=np.float32)
    return SequenceRecord(
        sequence_id=0,
        input_ids=np.array(teacher_ids, np.int32),
        topk_ids=np.tile(np.array([5, 4, 0, 3], np.int32), (len(rows), 1)),
        topk_logprobs=np.log(probs),
        tail_mass=(1 - probs.sum(-1)).astype(np.float32),
        positions=np.arange(len(rows), dtype=np.int32),
    )


def test_student_record_distills_inside_positions_and_counts_them():
    record = _record([5, 3, 5], [[0.4, 0.3, 0.1, 0.05]] * 3)
    student = student_record(record, _cross())
    assert student.positions.tolist() == [1, 2, 3, 4]
    assert student.inside.tolist() == [False, False, True, False]
    assert student.inside_ce_only == 1  # position 0: no teacher position encloses it
    assert student.tail_mass[2] == pytest.approx(0.15, abs=1e-6)
    assert student.topk_ids[2, :2].tolist() == [4, 2]  # bc 4/7, b 3/7
    batch = collate_student_records([student])
    stats = AlignmentStats()
    stats.update([batch])
    counts = stats.as_dict()
    assert counts["aligned_fraction"] == pytest.approx(3 / 5)
    assert counts["inside_fraction"] == pytest.approx(1 / 5)
    assert counts["inside_ce_only_fraction"] == pytest.approx(1 / 5)
    old = student_record(record, _cross("exact", distill_inside=False))
    assert old.positions.tolist() == [1, 2, 4] and old.inside_ce_only == 0


def test_prefix_and_inside_rows_have_the_same_loss_in_closed_form():
    """Rows with merged prefix ids and inside rows: the fused kernel agrees with autograd."""
    cross = _cross()
    student = student_record(_record([5, 3, 5], [[0.4, 0.3, 0.1, 0.05]] * 3), cross)
    rows = {
        "topk_ids": torch.from_numpy(student.topk_ids),
        "topk_logprobs": torch.from_numpy(student.topk_logprobs),
        "tail_mass": torch.from_numpy(student.tail_mass),
        "unmatched_probs": torch.from_numpy(student.unmatched_probs),
    }
    matched = torch.from_numpy(cross.student_matched)
    logits = torch.randn(len(student.positions), 6, dtype=torch.float64, requires_grad=True)
    for kind in ("fkl", "rkl", "akl"):
        setting = CrossTokenizerLoss(matched, kind=kind, uld_weight=1.0)
        reference = cross_tokenizer_kd_loss(logits, rows, setting)
        (grad,) = torch.autograd.grad(reference.sum(), logits)
        weight = torch.ones(len(student.positions), dtype=torch.float64)
        loss, closed = cross_tokenizer_loss_and_grad(logits.detach(), rows, setting, weight)
        assert torch.isfinite(reference).all()
        torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(closed.double(), grad, rtol=1e-4, atol=1e-6)


def test_an_unknown_vocab_map_is_refused():
    with pytest.raises(ConfigError, match="vocab_map must be one of exact, prefix"):
        _cross("nearest")
