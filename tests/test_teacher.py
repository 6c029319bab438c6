"""Teacher pass and top-k extraction against dense references (the model's own unbatched forward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdcache.cache.build.teacher import TeacherRunner, load_model, plan_batches, resolve_dtype
from kdcache.cache.errors import ConfigError
from kdcache.cache.extraction.heads import split_head
from kdcache.cache.extraction.topk import topk_from_hidden, topk_from_logits


def _dense_reference(model, seq: np.ndarray, temperature: float) -> torch.Tensor:
    """log_softmax of the model's own unbatched logits: (T, V) float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(seq[None], dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def test_topk_from_logits_matches_dense():
    torch.manual_seed(0)
    logits = torch.randn(7, 50) * 4  # (N, V)
    ids, logprobs, tail = topk_from_logits(logits, 5, temperature=2.0)
    reference = torch.log_softmax(logits.double() / 2.0, dim=-1)
    expected_values, expected_ids = reference.topk(5, dim=-1)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(logprobs.double(), expected_values, atol=1e-6, rtol=0)
    expected_tail = 1.0 - expected_values.exp().sum(-1)
    torch.testing.assert_close(tail.double(), expected_tail, atol=1e-7, rtol=1e-5)
    assert torch.all(logprobs[:, :-1] >= logprobs[:, 1:])


def test_tail_mass_is_never_negative_and_accurate_when_topk_mass_is_nearly_one():
    logits = torch.tensor([[30.0, 10.0, 0.0, -5.0], [3.0, 2.9, 2.8, 2.7]])
    _, _, tail = topk_from_logits(logits, 2)
    exact = torch.softmax(logits.double(), -1)[:, 2:].sum(-1)
    assert torch.all(tail >= 0)
    np.testing.assert_allclose(tail.double().numpy(), exact.numpy(), atol=2e-6, rtol=1e-5)
    _, _, full = topk_from_logits(logits, 4)
    assert torch.all(full == 0.0)
    torch.manual_seed(1)
    sharp = torch.randn(64, 1000) * 12  # (N, V) confident rows: top-8 mass close to 1
    _, _, tail = topk_from_logits(sharp, 8)
    reference = torch.softmax(sharp.double(), -1).topk(8, -1).values.sum(-1)
    assert torch.all(tail >= 0)
    np.testing.assert_allclose(tail.double().numpy(), (1 - reference).numpy(), atol=2e-6)


def test_chunked_head_equals_unchunked(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    head = split_head(model)
    hidden = torch.randn(23, model.config.hidden_size)
    with torch.no_grad():
        whole = topk_from_logits(head.logits(hidden), 4)
        chunked = topk_from_hidden(hidden, head, 4, chunk_elements=3 * head.vocab_size)
    assert torch.equal(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(whole[2], chunked[2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_head", [True, False])
def test_batched_equals_unbatched_forward(tiny_teacher_dir, use_head):
    model = load_model(str(tiny_teacher_dir), torch.float32, torch.device("cpu"))
    runner = TeacherRunner(model, top_k=6, temperature=1.5, use_head=use_head)
    assert (runner.head is not None) == use_head
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    sequences = [rng.integers(0, vocab, size=n).astype(np.int32) for n in (1, 5, 31, 12, 2)]
    positions = [np.arange(n) for n in (1, 5, 31, 12, 2)]
    positions[2] = np.array([0, 3, 4, 30])  # a subset, as for chat data
    batched = runner.run(sequences, positions)
    for seq, pos, rows in zip(sequences, positions, batched, strict=True):
        reference = _dense_reference(model, seq, 1.5)[torch.as_tensor(pos)]  # (M, V)
        values, ids = reference.topk(6, dim=-1)
        assert rows.topk_ids.shape == (len(pos), 6) and rows.topk_ids.dtype == np.int32
        np.testing.assert_array_equal(rows.topk_ids, ids.numpy())
        np.testing.assert_allclose(rows.topk_logprobs, values.numpy(), atol=2e-5)
        tail = 1.0 - values.exp().sum(-1)
        np.testing.assert_allclose(rows.tail_mass, tail.numpy(), atol=2e-6)
        alone = runner.run([seq], [pos])[0]
        np.testing.assert_allclose(rows.topk_logprobs, alone.topk_logprobs, atol=2e-5)


def test_plan_batches_respects_budget_and_covers_all():
    lengths = [5, 100, 7, 64, 64, 3, 200]
    batches = plan_batches(lengths, batch_tokens=130)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 130
    assert batches[0] == [6]  # longer than the budget: alone
    assert plan_batches(lengths, 130) == batches  # deterministic


def test_bad_dtype_and_missing_teacher(tmp_path):
    with pytest.raises(ConfigError, match="unknown --dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "nope"), torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))


def test_prefetch_keeps_order_reraises_and_stops():
    import threading

    from kdcache.cache.build.teacher import prefetch

    assert list(prefetch(range(50), size=2)) == list(range(50))

    def failing():
        yield 1
        raise ConfigError("bad row")

    with pytest.raises(ConfigError, match="bad row"):
        list(prefetch(failing()))
    before = threading.active_count()
    iterator = prefetch(iter(range(10_000)))
    next(iterator)
    iterator.close()  # the consumer goes away: the producer thread must end
    for _ in range(50):
        if threading.active_count() <= before:
            break
        import time

        time.sleep(0.05)
    assert threading.active_count() <= before
