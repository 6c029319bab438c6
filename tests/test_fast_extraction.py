"""The build's extraction without a (N, V) log-softmax equals the dense computation."""

from __future__ import annotations

import torch

from kdcache.cache.extraction.heads import OutputHead
from kdcache.cache.extraction.tail_sampling import (
    sample_tail,
    sequence_uniforms,
    topk_and_tail_samples,
)
from kdcache.cache.extraction.topk import head_logits, topk_from_hidden

V, H = 1000, 24  # V not a multiple of the sampler's 256-id blocks


def _head(bias: bool) -> tuple[OutputHead, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    weight = 2.0 * torch.randn(V, H, generator=gen)
    head = OutputHead(weight, torch.randn(V, generator=gen) if bias else None)
    return head, torch.randn(37, H, generator=gen)


def test_head_logits_into_a_reused_buffer_equal_the_head():
    for bias in (False, True):
        head, hidden = _head(bias)
        buffer = torch.full((16, V), float("nan"))
        for start in range(0, 37, 16):
            chunk = hidden[start : start + 16]
            torch.testing.assert_close(head_logits(head, chunk, buffer), head.logits(chunk))


def test_topk_from_hidden_in_place_equals_dense_log_softmax():
    head, hidden = _head(bias=True)
    dense = torch.log_softmax(head.logits(hidden) / 2.0, dim=-1)  # (N, V) reference
    values, ids = dense.topk(9, dim=-1)
    got_ids, got_logprobs, tail = topk_from_hidden(hidden, head, 9, temperature=2.0,
                                                   chunk_elements=10 * V)  # fmt: skip
    torch.testing.assert_close(got_logprobs, values, atol=1e-5, rtol=0)
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(
        tail, (1.0 - values.double().exp().sum(-1)).float(), atol=1e-6, rtol=0
    )


def test_topk_and_samples_from_one_exp_pass_equal_the_dense_sampler():
    """Same top-k and the same draws as ``sample_tail`` on the dense log-probs (the sampler's
    search is scale-free, so the unnormalized exponentials give the same ids up to rounding)."""
    head, hidden = _head(bias=False)
    logits = head.logits(hidden)  # (N, V)
    uniforms = sequence_uniforms(0, 7, hidden.shape[0], 32)
    ids, logprobs, tail, drawn, drawn_lp = topk_and_tail_samples(
        lambda start, end: head.logits(hidden[start:end]), hidden.shape[0], V, 6, uniforms,
        chunk_elements=8 * V,
    )  # fmt: skip
    dense = torch.log_softmax(logits, dim=-1)
    values, top = dense.topk(6, dim=-1)
    assert torch.equal(ids, top)
    torch.testing.assert_close(logprobs, values, atol=1e-5, rtol=0)
    reference_tail = (1.0 - values.double().exp().sum(-1)).float()  # no float32 cancellation
    torch.testing.assert_close(tail, reference_tail, atol=1e-5, rtol=0)
    ref_ids, _ = sample_tail(dense, top, torch.from_numpy(uniforms))
    assert (drawn == ref_ids).float().mean() > 0.995
    assert not (drawn[:, :, None] == top[:, None, :]).any()  # never a top-k id
    torch.testing.assert_close(drawn_lp, dense.gather(1, drawn), atol=1e-5, rtol=0)


def test_body_in_cpu_slices_writes_the_same_shards(tiny_llama_dir, tmp_path, monkeypatch):
    """The CPU runs the body in slices of CPU_BODY_TOKENS tokens: same shard bytes as one call."""
    import hashlib

    from kdcache.cache.build import teacher as teacher_module
    from kdcache.cache.build.pipeline import BuildConfig, build_cache
    from kdcache.cache.format.shards import SHARDS_DIR
    from tests.conftest import text_rows, write_jsonl

    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(8, seed=4))

    def build(out, body_tokens: int) -> dict[str, str]:
        monkeypatch.setattr(teacher_module, "CPU_BODY_TOKENS", body_tokens)
        build_cache(BuildConfig(teacher=str(tiny_llama_dir), data=str(data), out=out, top_k=8,
                                max_length=48, holdout=0.0, batch_tokens=400, progress=False))  # fmt: skip
        shards = sorted((out / SHARDS_DIR).glob("*.arrow"))
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}

    assert build(tmp_path / "sliced", 48) == build(tmp_path / "whole", 1 << 30)
