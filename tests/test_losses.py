"""sparse_kd_loss / dense_kd_loss against independent dense references written here (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.cache.errors import ConfigError
from kdcache.trainer.losses import LOSS_KINDS, dense_kd_loss, sparse_kd_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SKEW = 0.1


# ---------------------------------------------------------------- independent references
def ref_divergence(p: torch.Tensor, q: torch.Tensor, kind: str, head: torch.Tensor | None):
    """Divergence of explicit probability tables p, q (N, M), with 0 log 0 = 0."""

    def kl(a, b):
        ratio = torch.where(a > 0, a / b, torch.ones_like(a))
        return (torch.where(a > 0, a, torch.zeros_like(a)) * torch.log(ratio)).sum(-1)

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "akl":
        gap = (p - q).abs().detach()
        g_head = (gap * head).sum(-1)
        g_tail = (gap * ~head).sum(-1)
        return g_head / (g_head + g_tail) * kl(p, q) + g_tail / (g_head + g_tail) * kl(q, p)
    if kind == "js":
        m = (p + q) / 2
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew-fkl":
        return kl(p, SKEW * p + (1 - SKEW) * q)
    if kind == "skew-rkl":
        return kl(q, SKEW * q + (1 - SKEW) * p)
    raise AssertionError(kind)


def authors_akl_head(p: torch.Tensor, mu: float) -> torch.Tensor:
    """As in the AKL authors' code: sort descending, cumsum, head = cumsum <= mu, top-1 forced."""
    sorted_p, order = p.sort(-1, descending=True)
    head_sorted = sorted_p.cumsum(-1) <= mu
    head_sorted[:, 0] = True
    return torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)


def ref_full(student_logits, teacher_logits, kind, mu=0.5, temperature=1.0):
    q = torch.softmax(student_logits / temperature, -1)
    p = torch.softmax(teacher_logits / temperature, -1)
    head = authors_akl_head(p, mu) if kind == "akl" else None
    return ref_divergence(p, q, kind, head)


def ref_bucket(student_logits, topk_ids, p_topk, p_tail, kind, mu=0.5, temperature=1.0):
    """Coarsen both distributions to k + 1 outcomes densely, renormalize the teacher's."""
    q = torch.softmax(student_logits / temperature, -1)  # (N, V)
    q_topk = q.gather(1, topk_ids)
    q_tail = (q.sum(-1) - q_topk.sum(-1)).clamp_min(0)
    total = p_topk.sum(-1) + p_tail
    p = torch.cat([p_topk, p_tail[:, None]], 1) / total[:, None]
    qq = torch.cat([q_topk, q_tail[:, None]], 1)
    head = None
    if kind == "akl":
        head = authors_akl_head(p[:, :-1], mu)
        head = torch.cat([head, torch.zeros_like(head[:, :1])], 1)
    return ref_divergence(p, qq, kind, head)


def teacher_topk(teacher_logits, k, temperature=1.0):
    logp = torch.log_softmax(teacher_logits / temperature, -1)
    values, ids = logp.topk(k, dim=-1)
    tail = (1 - values.exp().sum(-1)).clamp_min(0)
    return ids, values, tail


def logits_pair(n=6, vocab=13, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(n, vocab, generator=gen, dtype=torch.float64)).requires_grad_()
    teacher = scale * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    return student, teacher


def grad_of(loss, x):
    (grad,) = torch.autograd.grad(loss.sum(), x, retain_graph=True)
    return grad


# ---------------------------------------------------------------- equality with the references
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_k_equals_vocab_matches_full_vocabulary(kind):
    student, teacher = logits_pair()
    ids, logprobs, _ = teacher_topk(teacher, teacher.shape[1])
    got = sparse_kd_loss(student, ids, logprobs, torch.zeros(6, dtype=torch.float64), kind=kind)
    want = ref_full(student, teacher, kind)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(got, student), grad_of(want, student), rtol=1e-9, atol=1e-12)
    dense = dense_kd_loss(student, teacher, kind=kind)
    torch.testing.assert_close(dense, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(dense, student), grad_of(want, student))


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_k_below_vocab_matches_bucket_formulas(kind, k):
    student, teacher = logits_pair(seed=k)
    ids, logprobs, tail = teacher_topk(teacher, k)
    got = sparse_kd_loss(student, ids, logprobs, tail, kind=kind)
    want = ref_bucket(student, ids, logprobs.exp(), tail, kind)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_of(got, student), grad_of(want, student), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "akl"])
@pytest.mark.parametrize("mu", [0.2, 0.5, 0.9])
def test_akl_mu_and_bucket_sides(kind, mu):
    student, teacher = logits_pair(n=16, vocab=20, seed=3, scale=3.0)
    ids, logprobs, tail = teacher_topk(teacher, 5)
    got = sparse_kd_loss(student, ids, logprobs, tail, kind=kind, mu=mu)
    want = ref_bucket(student, ids, logprobs.exp(), tail, kind, mu=mu)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    full_ids, full_lp, _ = teacher_topk(teacher, 20)
    got_full = sparse_kd_loss(student, full_ids, full_lp, kind=kind, mu=mu)
    torch.testing.assert_close(got_full, ref_full(student, teacher, kind, mu=mu))


def test_akl_hand_checked_value():
    # p = (0.6, 0.3, 0.1), q = (0.3, 0.3, 0.4); mu = 0.5 -> head = {top-1}; gaps 0.3 | 0 + 0.3.
    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.3, 0.4]], dtype=torch.float64)
    fkl = 0.6 * math.log(2) + 0.1 * math.log(0.25)
    rkl = 0.3 * math.log(0.5) + 0.4 * math.log(4)
    ids = torch.tensor([[0, 1, 2]])
    got = sparse_kd_loss(q.log(), ids, p.log(), kind="akl", mu=0.5)
    assert got.item() == pytest.approx(0.5 * fkl + 0.5 * rkl, rel=1e-12)
    assert dense_kd_loss(q.log(), p.log(), kind="akl").item() == pytest.approx(0.5 * (fkl + rkl))
    # top-2 with the bucket {2}: head {0}, tail {1, bucket}: the same gaps and outcomes.
    got2 = sparse_kd_loss(q.log(), ids[:, :2], p.log()[:, :2], torch.tensor([0.1]), kind="akl")
    assert got2.item() == pytest.approx(0.5 * fkl + 0.5 * rkl, rel=1e-6)


def test_tail_mass_none_uses_one_minus_topk_mass():
    student, teacher = logits_pair(seed=5)
    ids, logprobs, tail = teacher_topk(teacher, 4)
    got = sparse_kd_loss(student, ids, logprobs, None, kind="fkl")
    torch.testing.assert_close(got, sparse_kd_loss(student, ids, logprobs, tail, kind="fkl"))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "akl"])
def test_renormalizes_when_rounded_values_do_not_sum_to_one(kind):
    student, teacher = logits_pair(seed=7)
    ids, logprobs, tail = teacher_topk(teacher, 4)
    rounded = logprobs.to(torch.float16).to(torch.float64)  # stored fp16: sum != 1 - tail
    stored_tail = tail * 1.01
    got = sparse_kd_loss(student, ids, rounded, stored_tail, kind=kind)
    want = ref_bucket(student, ids, rounded.exp(), stored_tail, kind)  # divides by the total
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    scaled = sparse_kd_loss(student, ids, rounded + math.log(3), stored_tail * 3, kind=kind)
    torch.testing.assert_close(scaled, got, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_padding_entries_are_absent(kind):
    student, teacher = logits_pair(n=4, seed=9)
    ids, logprobs, tail = teacher_topk(teacher, 6)
    # Row r keeps 6 - r entries; the rest is padding: id 0, log-prob -inf, at the end of the row.
    keep = torch.tensor([6, 5, 3, 1])
    padded_ids, padded_lp = ids.clone(), logprobs.clone()
    padded_tail = tail.clone()
    for row, n_keep in enumerate(keep.tolist()):
        padded_tail[row] = 1 - logprobs[row, :n_keep].exp().sum()
        padded_ids[row, n_keep:] = 0
        padded_lp[row, n_keep:] = -math.inf
    got = sparse_kd_loss(student, padded_ids, padded_lp, padded_tail, kind=kind)
    for row, n_keep in enumerate(keep.tolist()):
        one = sparse_kd_loss(
            student[row : row + 1],
            ids[row : row + 1, :n_keep],
            logprobs[row : row + 1, :n_keep],
            padded_tail[row : row + 1],
            kind=kind,
        )
        torch.testing.assert_close(got[row : row + 1], one, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grad_of(got, student)).all()


def test_padding_does_not_mask_a_real_token_zero():
    student, _ = logits_pair(n=1, vocab=5, seed=11)
    ids = torch.tensor([[0, 3, 0]])  # real id 0 first, then padding with id 0
    logprobs = torch.tensor([[math.log(0.5), math.log(0.2), -math.inf]], dtype=torch.float64)
    got = sparse_kd_loss(student, ids, logprobs, torch.tensor([0.3], dtype=torch.float64), "fkl")
    want = ref_bucket(student, ids[:, :2], logprobs[:, :2].exp(), torch.tensor([0.3]), "fkl")
    torch.testing.assert_close(got, want.to(got.dtype))


# ---------------------------------------------------------------- stability
def _assert_finite(loss, x):
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(grad_of(loss, x)).all()


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_stable_at_tail_mass_zero_and_one(kind):
    student, teacher = logits_pair(n=3, seed=13)
    student = student.detach().float().requires_grad_()
    ids, logprobs, _ = teacher_topk(teacher.float(), 4)
    _assert_finite(sparse_kd_loss(student, ids, logprobs, torch.zeros(3), kind=kind), student)
    _assert_finite(sparse_kd_loss(student, ids, logprobs, torch.ones(3), kind=kind), student)
    all_padding = torch.full_like(logprobs, -math.inf)
    loss = sparse_kd_loss(student, torch.zeros_like(ids), all_padding, torch.ones(3), kind=kind)
    _assert_finite(loss, student)
    assert torch.allclose(loss, torch.zeros(3), atol=1e-6)  # teacher and student: all in bucket


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_identical_distributions_give_zero(kind):
    student, _ = logits_pair(n=3, vocab=9, seed=17)
    student = student.detach().float().requires_grad_()
    ids, logprobs, tail = teacher_topk(student.detach(), 4)
    loss = sparse_kd_loss(student, ids, logprobs, tail, kind=kind)
    _assert_finite(loss, student)
    assert loss.abs().max() < 1e-6
    full_ids, full_lp, _ = teacher_topk(student.detach(), 9)
    loss = sparse_kd_loss(student, full_ids, full_lp, kind=kind)  # k = V: no bucket at all
    _assert_finite(loss, student)
    assert loss.abs().max() < 1e-6
    _assert_finite(dense_kd_loss(student, student.detach(), kind=kind), student)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_very_peaked_logits(kind):
    student, teacher = logits_pair(n=4, vocab=50, seed=19, scale=200.0)
    student = student.detach().float().requires_grad_()
    ids, logprobs, tail = teacher_topk(teacher.float(), 4)
    loss = sparse_kd_loss(student, ids, logprobs, tail, kind=kind)
    _assert_finite(loss, student)
    _assert_finite(dense_kd_loss(student, teacher.float(), kind=kind), student)


def test_tiny_student_tail_is_exact_in_log_space():
    # The student puts ~1e-30 outside S: 1 - sum(q_S) is 0 in float32, the log-space tail is not.
    student = torch.tensor([[30.0, 30.0, -39.0]], requires_grad=True)
    ids, logprobs = torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.4]]))
    loss = sparse_kd_loss(student, ids, logprobs, torch.tensor([0.1]), kind="fkl")
    q_tail = math.exp(-69.0) / 2
    want = 0.5 * math.log(0.5 / 0.5) + 0.4 * math.log(0.4 / 0.5) + 0.1 * math.log(0.1 / q_tail)
    assert loss.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_student_logits_computed_in_float32(dtype):
    student, teacher = logits_pair(seed=23)
    ids, logprobs, tail = teacher_topk(teacher, 4)
    low = student.detach().to(dtype).requires_grad_()
    got = sparse_kd_loss(low, ids.int(), logprobs.float(), tail.float(), kind="akl")
    assert got.dtype == torch.float32
    want = ref_bucket(low.detach().double(), ids, logprobs.exp(), tail, "akl")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert low.grad is None and torch.isfinite(grad_of(got, low).float()).all()


# ---------------------------------------------------------------- temperature and reductions
@pytest.mark.parametrize("kind", ["fkl", "rkl", "akl"])
def test_temperature_divides_student_logits(kind):
    student, teacher = logits_pair(seed=29)
    temperature = 2.5
    ids, logprobs, tail = teacher_topk(teacher, 5, temperature=temperature)
    got = sparse_kd_loss(student, ids, logprobs, tail, kind=kind, temperature=temperature)
    want = ref_bucket(student, ids, logprobs.exp(), tail, kind, temperature=temperature)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_of(got, student), grad_of(want, student), rtol=1e-8, atol=1e-12)
    dense = dense_kd_loss(student, teacher, kind=kind, temperature=temperature)
    torch.testing.assert_close(dense, ref_full(student, teacher, kind, temperature=temperature))


def test_reductions():
    student, teacher = logits_pair(seed=31)
    ids, logprobs, tail = teacher_topk(teacher, 3)
    per_row = sparse_kd_loss(student, ids, logprobs, tail, kind="rkl")
    assert per_row.shape == (6,)
    mean = sparse_kd_loss(student, ids, logprobs, tail, kind="rkl", reduction="mean")
    total = sparse_kd_loss(student, ids, logprobs, tail, kind="rkl", reduction="sum")
    assert mean.shape == () and total.shape == ()
    torch.testing.assert_close(mean, per_row.mean())
    torch.testing.assert_close(total, per_row.sum())


def test_dense_padded_student_vocabulary():
    student, teacher = logits_pair(vocab=12, seed=37)
    got = dense_kd_loss(student, teacher[:, :10], kind="fkl")
    ids, logprobs, _ = teacher_topk(teacher[:, :10], 10)
    torch.testing.assert_close(got, sparse_kd_loss(student, ids, logprobs, torch.zeros(6), "fkl"))


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "kl"}, "unknown loss kind 'kl'"),
        ({"mu": 0.0}, "mu must be in"),
        ({"mu": 1.5}, "mu must be in"),
        ({"reduction": "avg"}, "unknown reduction"),
        ({"temperature": 0.0}, "temperature must be a positive"),
        ({"skew": 1.0}, "skew must be in"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    student, teacher = logits_pair()
    ids, logprobs, tail = teacher_topk(teacher, 3)
    with pytest.raises(ConfigError, match=match):
        sparse_kd_loss(student, ids, logprobs, tail, **kwargs)
    with pytest.raises(ConfigError, match=match):
        dense_kd_loss(student, teacher, **kwargs)


def test_bad_shapes_are_refused():
    student, teacher = logits_pair(vocab=13)
    ids, logprobs, tail = teacher_topk(teacher, 3)
    with pytest.raises(ConfigError, match=r"must be \(N, V\)"):
        sparse_kd_loss(student[None], ids, logprobs, tail)
    with pytest.raises(ConfigError, match="must both be"):
        sparse_kd_loss(student, ids[:3], logprobs, tail)
    with pytest.raises(ConfigError, match="tail_mass must be"):
        sparse_kd_loss(student, ids, logprobs, tail[:2])
    with pytest.raises(ConfigError, match="outside the student's vocabulary"):
        sparse_kd_loss(student[:, :5], ids.clamp_min(6), logprobs, tail)
    with pytest.raises(ConfigError, match="integer"):
        sparse_kd_loss(student, ids.double(), logprobs, tail)
    with pytest.raises(ConfigError, match="do not fit"):
        dense_kd_loss(student[:, :5], teacher)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_minus_inf_student_logits_give_no_nan(kind):
    student, teacher = logits_pair(n=3, seed=41)
    student = student.detach().float()
    ids, logprobs, tail = teacher_topk(teacher.float(), 4)
    student[0, ids[0, 1]] = -math.inf  # a top-k token the student rules out
    student[1, (ids[1, 0] + 1) % 13] = -math.inf  # a tail token (masked vocabulary)
    student.requires_grad_()
    loss = sparse_kd_loss(student, ids, logprobs, tail, kind=kind)
    assert not torch.isnan(loss).any()
    assert not torch.isnan(grad_of(loss, student)).any()
    assert torch.isfinite(loss[1:]).all()
