"""fast_topk returns torch.topk's values and ids exactly (ties included), and builds with it write
the same shard bytes as builds with torch.topk."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from kdcache.cache.build.pipeline import BuildConfig, build_cache
from kdcache.cache.extraction import block_topk
from kdcache.cache.extraction.topk import fast_topk
from kdcache.cache.format.shards import SHARDS_DIR
from tests.conftest import text_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_same_as_torch(values: torch.Tensor, top_k: int) -> None:
    got_values, got_ids = fast_topk(values, top_k)
    want_values, want_ids = torch.topk(values, top_k, dim=-1, largest=True, sorted=True)
    assert got_ids.dtype == torch.int64 and got_values.dtype == values.dtype
    torch.testing.assert_close(got_values, want_values, rtol=0, atol=0, equal_nan=True)  # exact
    assert torch.equal(got_ids, want_ids)


@pytest.mark.parametrize(
    ("rows", "vocab", "top_k"),
    [
        (64, 8192, 8),  # the smallest fast vocabulary
        (64, 16384, 24),  # groups of 8
        (64, 16384, 64),  # groups of 16
        (32, 32768, 1),
        (32, 32768, 64),
        (32, 32003, 24),  # odd: trailing columns past the last whole group
        (32, 50257, 64),
        (8, 131072, 24),
        (8, 131072, 64),
        (4, 151936, 100),
    ],
)
def test_fast_topk_equals_torch_topk_on_random_rows(rows, vocab, top_k):
    assert block_topk._fast_path(torch.empty(1, vocab), top_k)
    gen = torch.Generator().manual_seed(vocab + top_k)
    _assert_same_as_torch(3.0 * torch.randn(rows, vocab, generator=gen), top_k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fast_topk_other_float_dtypes(dtype):
    """Half precision ties often (few distinct values): every tie row takes torch.topk's ids."""
    gen = torch.Generator().manual_seed(1)
    _assert_same_as_torch((2.0 * torch.randn(32, 32768, generator=gen)).to(dtype), 64)


def test_ties_follow_torch_topk():
    """Many equal values (a few distinct integers per row): inside the top-k, at its boundary,
    and across the group maxima; the ids are torch.topk's own, not "lowest id first"."""
    gen = torch.Generator().manual_seed(2)
    values = torch.randint(0, 40, (32, 16384), generator=gen).float()
    _assert_same_as_torch(values, 64)
    _assert_same_as_torch(values, 24)
    stable = torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :64]
    assert not torch.equal(fast_topk(values, 64)[1], stable)  # torch.topk's rule is its own


def test_a_tie_only_at_the_boundary():
    """Distinct values except two equal ones competing for the last place."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(16, 16384, generator=gen)
    top = torch.topk(values, 25).indices  # (16, 25)
    kth = values.gather(1, top[:, 23:24])  # (16, 1)
    values.scatter_(1, top[:, 24:25], kth)  # the 25th now ties the 24th
    _assert_same_as_torch(values, 24)


def test_minus_infinity_masks():
    """-inf over most of a row (fewer finite values than k: ties at -inf), whole rows of -inf,
    and -inf in a few places only."""
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(12, 16384, generator=gen)
    values[:4, 40:] = -math.inf  # 40 finite values, k = 64
    values[4:6] = -math.inf
    values[6:, ::3] = -math.inf
    _assert_same_as_torch(values, 64)


def test_nan_rows_follow_torch_topk():
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(8, 16384, generator=gen)
    values[2, 77] = math.nan
    _assert_same_as_torch(values, 24)


def test_k_near_the_vocabulary_and_small_rows_use_torch_topk():
    gen = torch.Generator().manual_seed(6)
    values = torch.randn(4, 32768, generator=gen)
    assert not block_topk._fast_path(values, 32000)
    _assert_same_as_torch(values, 32000)
    _assert_same_as_torch(values, 32768)
    small = torch.randn(4, 4096, generator=gen)
    assert not block_topk._fast_path(small, 8)
    _assert_same_as_torch(small, 8)


def test_shapes_and_bad_k():
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(2, 3, 16384, generator=gen)
    _assert_same_as_torch(values, 16)  # leading dimensions are kept
    _assert_same_as_torch(torch.empty(0, 16384), 16)
    _assert_same_as_torch(values, 0)
    with pytest.raises(ValueError, match="top_k must be in"):
        fast_topk(values, 16385)


def _tiny_wide_teacher(out_dir: Path, tokenizer) -> Path:
    """A 2-layer Llama whose output vocabulary (8192, padded past the tokenizer) takes the fast
    path of fast_topk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # a peaked teacher: a real tail and a real top-k
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _shard_digests(out: Path) -> dict[str, str]:
    shards = sorted((out / SHARDS_DIR).glob("*.arrow"))
    assert shards
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in shards}


def _plain_topk(values: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(values, top_k, dim=-1, largest=True, sorted=True)


@pytest.mark.parametrize("settings", [{"top_k": 16}, {}], ids=["topk", "topk+tail"])
def test_build_shards_equal_a_build_with_torch_topk(
    settings, tiny_tokenizer, tmp_path, monkeypatch
):
    teacher = _tiny_wide_teacher(tmp_path / "teacher", tiny_tokenizer)
    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(6, seed=3))

    def build(out: Path) -> dict[str, str]:
        build_cache(BuildConfig(teacher=str(teacher), data=str(data), out=out, max_length=64,
                                holdout=0.0, batch_tokens=256, progress=False, **settings))  # fmt: skip
        return _shard_digests(out)

    fast = build(tmp_path / "fast")
    monkeypatch.setattr("kdcache.cache.extraction.topk.fast_topk", _plain_topk)
    assert build(tmp_path / "plain") == fast
