"""Cross-tokenizer mapping and loss against dense references written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.trainer.cross_tokenizer.loss import (
    CrossTokenizerLoss,
    cross_tokenizer_kd_loss,
    cross_tokenizer_loss_and_grad,
)
from kdcache.trainer.cross_tokenizer.mapping import map_teacher_rows
from kdcache.trainer.cross_tokenizer.uld import uld_loss, uld_loss_and_grad
from tests import xtok_helpers as hand

TEACHER_TO_STUDENT = np.array(hand.TEACHER_TO_STUDENT)  # 7 teacher ids -> 6 student ids
STUDENT_MATCHED = torch.tensor([True, True, True, True, False, True])  # only 'bc' unmatched
ROW_NAMES = ("topk_ids", "topk_logprobs", "tail_mass", "unmatched_probs")


def _teacher(seed: int, top_k: int):
    """A dense teacher over the 7 teacher ids and its cached top-k + tail."""
    rng = np.random.default_rng(seed)
    dense = rng.dirichlet(np.full(7, 0.7), size=3)  # (3, 7)
    order = np.argsort(-dense, axis=-1)[:, :top_k]
    top = np.take_along_axis(dense, order, -1)
    return dense, order, np.log(top).astype(np.float32), (1 - top.sum(-1)).astype(np.float32)


def test_mapping_against_a_hand_written_dense_reference():
    dense, ids, logprobs, tail = _teacher(seed=0, top_k=4)
    mapped = map_teacher_rows(ids, logprobs, tail, TEACHER_TO_STUDENT)
    for row in range(3):
        # by hand: a top-k teacher id with a student match keeps its probability at that
        # student id; unmatched top-k ids (teacher 'ab' = 4, 'abc' = 5) and the tail: the bucket
        expected_student = {}
        unmatched, bucket = [], 1.0 - sum(dense[row, i] for i in ids[row])
        for teacher_id in ids[row]:
            student_id = hand.TEACHER_TO_STUDENT[teacher_id]
            if student_id >= 0:
                expected_student[student_id] = dense[row, teacher_id]
            else:
                unmatched.append(dense[row, teacher_id])
                bucket += dense[row, teacher_id]
        got = {
            int(i): math.exp(lp)
            for i, lp in zip(mapped.topk_ids[row], mapped.topk_logprobs[row], strict=True)
            if lp > -math.inf
        }
        assert got.keys() == expected_student.keys()
        for key, value in expected_student.items():
            assert math.isclose(got[key], value, rel_tol=1e-5)
        assert math.isclose(float(mapped.tail_mass[row]), bucket, rel_tol=1e-5)
        want = sorted(unmatched, reverse=True) + [0.0] * (4 - len(unmatched))
        np.testing.assert_allclose(mapped.unmatched_probs[row], want, rtol=1e-5)
        assert math.isclose(float(mapped.matched_mass[row]), sum(expected_student.values()),
                            rel_tol=1e-5)  # fmt: skip


def _dense_reference(logits, dense_row, top_ids, temperature, uld_weight):
    """FKL over (matched top-k outcomes + bucket) and ULD, by plain Python loops."""
    q = torch.softmax(logits.double() / temperature, -1).tolist()
    p_outcomes, q_outcomes, unmatched_p = [], [], []
    for teacher_id in top_ids:
        student_id = hand.TEACHER_TO_STUDENT[teacher_id]
        if student_id >= 0:
            p_outcomes.append(dense_row[teacher_id])
            q_outcomes.append(q[student_id])
        else:
            unmatched_p.append(dense_row[teacher_id])
    p_outcomes.append(1.0 - sum(p_outcomes))
    q_outcomes.append(1.0 - sum(q_outcomes))
    fkl = sum(p * (math.log(p) - math.log(r)) for p, r in zip(p_outcomes, q_outcomes, strict=True))
    unmatched_q = sorted((q[j] for j in range(6) if not STUDENT_MATCHED[j]), reverse=True)
    unmatched_q += [0.0] * len(unmatched_p)  # the shorter sorted vector is padded with zeros
    unmatched_p.sort(reverse=True)
    uld = sum(abs(p - unmatched_q[r]) for r, p in enumerate(unmatched_p))
    return fkl + uld_weight * uld


def test_loss_equals_the_dense_reference():
    dense, ids, logprobs, tail = _teacher(seed=1, top_k=5)
    mapped = map_teacher_rows(ids, logprobs, tail, TEACHER_TO_STUDENT)
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    for temperature, uld_weight in ((1.0, 1.0), (2.0, 0.3)):
        rows = {name: torch.from_numpy(getattr(mapped, name)) for name in ROW_NAMES}
        setting = CrossTokenizerLoss(STUDENT_MATCHED, "fkl", temperature=temperature,
                                     uld_weight=uld_weight)  # fmt: skip
        loss = cross_tokenizer_kd_loss(logits, rows, setting)
        for row in range(3):
            want = _dense_reference(logits[row], dense[row], ids[row], temperature, uld_weight)
            assert math.isclose(float(loss[row]), want, rel_tol=1e-4, abs_tol=1e-6)


def test_uld_by_hand():
    # student probabilities over 4 ids: ids 0, 1 matched; unmatched 2 (0.3), 3 (0.1)
    probs = torch.tensor([[0.4, 0.2, 0.3, 0.1]])
    matched = torch.tensor([True, True, False, False])
    teacher = torch.tensor([[0.25, 0.05, 0.0]])  # sorted, 0-padded
    loss = uld_loss(probs.log(), teacher, matched)
    assert math.isclose(float(loss), abs(0.3 - 0.25) + abs(0.1 - 0.05), rel_tol=1e-5)


def _random_case(seed: int, rows: int = 6, vocab: int = 40, k: int = 8, share: float = 0.6):
    """``share`` of the student ids have a teacher match; the teacher shares the student's ids."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 2
    matched = torch.rand(vocab, generator=generator) < share
    teacher = torch.softmax(torch.randn(rows, vocab, generator=generator) * 2, -1)
    top = teacher.topk(k, -1)
    ids = top.indices.clone()
    logprobs = top.values.log()
    unmatched = ~matched[ids]  # pretend the teacher shares the student's ids, minus these
    unmatched_probs = torch.where(unmatched, top.values, 0.0).sort(-1, descending=True).values
    logprobs = logprobs.masked_fill(unmatched, -math.inf)
    tail = 1.0 - torch.where(unmatched, 0.0, top.values).sum(-1)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[0] = -100
    rows = dict(zip(ROW_NAMES, (ids, logprobs, tail, unmatched_probs), strict=True))
    return logits, rows, matched, labels


@pytest.mark.parametrize("share", [0.6, 0.95])  # 0.95: fewer unmatched student ids than ranks
def test_uld_closed_form_gradient_equals_autograd(share):
    logits, rows, matched, _ = _random_case(seed=3, share=share)
    assert share < 0.9 or int((~matched).sum()) < rows["unmatched_probs"].shape[1]
    unmatched_probs = rows["unmatched_probs"]
    weight = torch.linspace(0.5, 2.0, logits.shape[0])
    for temperature in (1.0, 1.7):
        leaf = logits.clone().requires_grad_()
        reference = weight * uld_loss(leaf, unmatched_probs, matched, temperature)
        (want,) = torch.autograd.grad(reference.sum(), leaf)
        loss, grad = uld_loss_and_grad(logits, unmatched_probs, matched, weight, temperature)
        torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-7)


def test_combined_closed_form_equals_autograd_for_every_divergence():
    logits, rows, matched, labels = _random_case(seed=4)
    kd_weight = torch.linspace(0.1, 1.0, logits.shape[0])
    ce_weight = torch.full((logits.shape[0],), 0.25)
    for kind in ("fkl", "rkl", "akl"):
        setting = CrossTokenizerLoss(matched, kind, temperature=1.5, uld_weight=0.7)
        leaf = logits.clone().requires_grad_()
        kd = cross_tokenizer_kd_loss(leaf, rows, setting)
        ce = torch.nn.functional.cross_entropy(leaf, labels, ignore_index=-100, reduction="none")
        reference = kd_weight * kd + ce_weight * ce
        (want,) = torch.autograd.grad(reference.sum(), leaf)
        loss, grad = cross_tokenizer_loss_and_grad(
            logits, rows, setting, kd_weight, labels, ce_weight
        )
        torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
