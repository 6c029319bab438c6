"""The block codec: exact mode is lossless up to fp16, compact mode's KL bound, the spec's recipe."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kdcache.cache import CacheError, ConfigError, ShardWriter, canonical_order
from kdcache.cache.format.blocks import (
    COMPACT_GROWTH,
    COMPACT_KEEP_MASS,
    COMPACT_LEVELS,
    COMPACT_STEP,
    BlockCodec,
    stored_logprobs,
    synthetic_records,
)
from kdcache.cache.format.codecs import ENCODINGS

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def sharp_records(num_records: int, top_k: int, vocab_size: int, seed: int):
    """Records whose rows look like a trained LM's: a few likely tokens, a long decaying head."""
    rng = np.random.default_rng(seed)
    records = synthetic_records(num_records, top_k=top_k, vocab_size=vocab_size, seed=seed)
    for record in records:
        rows = record.num_positions
        logits = rng.standard_normal((rows, vocab_size)) * rng.uniform(1.0, 4.0, (rows, 1))
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        ids = np.argsort(-logp, axis=1)[:, :top_k]
        top = np.take_along_axis(logp, ids, axis=1)
        record.topk_ids = ids.astype(np.int32)
        record.topk_logprobs = top.astype(np.float32)
        record.tail_mass = np.clip(1 - np.exp(top).sum(axis=1), 0, 1).astype(np.float32)
    return records


def bucket_kl(p_logprobs, p_tail, p_ids, q_logprobs, q_tail, q_ids) -> np.ndarray:
    """KL(p || q) per row over the k+1 outcomes of p (top-k + tail bucket), q renormalized.

    An id of p that q does not store counts as part of q's tail bucket: its mass merges with p's
    tail (the coarsened distribution), so the bucket of p and q describe the same token set.
    """
    out = np.zeros(p_logprobs.shape[0])
    for row in range(p_logprobs.shape[0]):
        p = {
            int(i): float(np.exp(lp))
            for i, lp in zip(p_ids[row], p_logprobs[row], strict=True)
            if lp > -np.inf
        }
        q = {
            int(i): float(np.exp(lp))
            for i, lp in zip(q_ids[row], q_logprobs[row], strict=True)
            if lp > -np.inf
        }
        p_bucket = float(p_tail[row]) + sum(v for i, v in p.items() if i not in q)
        total_p = sum(v for i, v in p.items() if i in q) + p_bucket
        total_q = sum(q.values()) + float(q_tail[row])
        kl = sum(
            v / total_p * np.log((v / total_p) / (q[i] / total_q)) for i, v in p.items() if i in q
        )
        if p_bucket > 0:
            kl += p_bucket / total_p * np.log((p_bucket / total_p) / (float(q_tail[row]) / total_q))
        out[row] = kl
    return out


@pytest.mark.parametrize("top_k", [1, 5, 300])
def test_exact_block_round_trip(top_k):
    vocab = 70_000 if top_k == 300 else 900  # 3 id byte planes, uint16 counts for k > 255
    records = synthetic_records(12, top_k=top_k, vocab_size=vocab, seed=top_k, max_tokens=20)
    codec = BlockCodec(mode="exact", top_k=top_k, vocab_size=vocab)
    batch = codec.encode(records)
    for written, read in zip(records, codec.decode(batch), strict=True):
        lp16 = stored_logprobs(written.topk_logprobs)
        order = canonical_order(written.topk_ids, lp16)
        np.testing.assert_array_equal(read.topk_ids, np.take_along_axis(written.topk_ids, order, 1))
        np.testing.assert_array_equal(read.topk_logprobs, np.take_along_axis(lp16, order, 1))
        np.testing.assert_array_equal(read.tail_mass, written.tail_mass)
        np.testing.assert_array_equal(read.positions, written.positions)
        np.testing.assert_array_equal(read.input_ids, written.input_ids)
        assert read.input_ids.flags.writeable and read.topk_ids.flags.owndata


def test_exact_values_are_fp16_rounded_float32():
    (record,) = synthetic_records(1, top_k=16, vocab_size=100, seed=0, chat_every=0, pad_fraction=0)
    codec = BlockCodec(mode="exact", top_k=16, vocab_size=100)
    (read,) = codec.decode(codec.encode([record]))
    assert read.topk_logprobs.dtype == np.float32
    # every value is exactly representable in fp16 and equals fp16(original)
    np.testing.assert_array_equal(
        read.topk_logprobs.astype(np.float16).astype(np.float32), read.topk_logprobs
    )
    by_id = lambda ids, lp: lp[np.arange(lp.shape[0])[:, None], np.argsort(ids, axis=1)]  # noqa: E731
    np.testing.assert_array_equal(
        np.sort(by_id(read.topk_ids, read.topk_logprobs), axis=1),
        np.sort(
            by_id(record.topk_ids, np.float16(record.topk_logprobs).astype(np.float32)), axis=1
        ),
    )


def test_compact_kl_bound_and_drop_rule():
    top_k, vocab = 32, 2000
    records = sharp_records(8, top_k=top_k, vocab_size=vocab, seed=11)
    codec = BlockCodec(mode="compact", top_k=top_k, vocab_size=vocab)
    kls, dropped = [], []
    for written, read in zip(records, codec.decode(codec.encode(records)), strict=True):
        np.testing.assert_array_equal(read.positions, written.positions)
        if not written.num_positions:
            continue
        kls.append(
            bucket_kl(
                written.topk_logprobs,
                written.tail_mass,
                written.topk_ids,
                read.topk_logprobs,
                read.tail_mass,
                read.topk_ids,
            )
        )
        kept_mass = np.exp(read.topk_logprobs.astype(np.float64)).sum(axis=1)
        dropped.append(np.exp(written.topk_logprobs).sum(axis=1) - kept_mass)
        # the stored ids are a prefix of the written probability order
        for row in range(written.num_positions):
            stored = set(read.topk_ids[row][read.topk_logprobs[row] > -np.inf].tolist())
            n = len(stored)
            assert stored == set(written.topk_ids[row][:n].tolist())
    kl = np.concatenate(kls)
    assert kl.mean() <= 1e-3, kl.mean()
    # quantization error: half a step per stored log-prob at most (top-1 is fp16)
    assert np.concatenate(dropped).max() <= (1 - COMPACT_KEEP_MASS) * 1.2 + 0.03
    assert COMPACT_STEP <= 1 / 8


def test_compact_levels_quantize_to_the_nearest_level_with_bounded_error():
    """Brute-force nearest level as the reference; error <= half the local step, top-1 exact."""
    rng = np.random.default_rng(3)
    below = np.concatenate([[0.0, 1e-4, 0.03, 24.0, 40.0], rng.uniform(0, 26, 4000)])
    top = np.float32(-0.5)  # exactly representable in fp16
    logprobs = (top - below).astype(np.float32)  # (N,) one row, most probable first
    counts = np.array([logprobs.shape[0]])
    compact = ENCODINGS["compact"]
    blob = compact.encode_logprobs(counts, logprobs)
    decoded, levels = compact.decode_logprobs(blob, counts, logprobs.shape[0])
    reference = np.abs((top - logprobs)[:, None] - COMPACT_LEVELS).argmin(-1)
    np.testing.assert_array_equal(levels, reference)
    np.testing.assert_array_equal(decoded, top - COMPACT_LEVELS[reference])
    assert decoded[0] == top  # the top-1 itself is stored exactly (fp16)
    gaps = np.diff(COMPACT_LEVELS)
    assert np.all(gaps >= COMPACT_STEP - 1e-6) and COMPACT_LEVELS[-1] >= 24.0
    inside = below <= COMPACT_LEVELS[-1]
    local = np.maximum(COMPACT_STEP, COMPACT_GROWTH * below) * (1 + COMPACT_GROWTH)
    assert np.all(np.abs(decoded - logprobs)[inside] <= local[inside] / 2 + 1e-5)


def test_unknown_mode_and_version_are_refused():
    codec = BlockCodec(mode="exact", top_k=4, vocab_size=10)
    meta = codec.schema_metadata()
    assert BlockCodec.from_schema_metadata(meta, "s-0") == codec
    with pytest.raises(CacheError, match="shard s-0 uses storage mode 'sampled'"):
        BlockCodec.from_schema_metadata({**meta, b"mode": b"sampled"}, "s-0")
    with pytest.raises(CacheError, match="shard s-0 has format_version 7"):
        BlockCodec.from_schema_metadata({**meta, b"format_version": b"7"}, "s-0")
    compact = BlockCodec(mode="compact", top_k=4, vocab_size=10).schema_metadata()
    assert BlockCodec.from_schema_metadata(compact, "s-1").mode == "compact"
    old_scheme = {k: v for k, v in compact.items() if k != b"compact_scheme"}
    old_scheme[b"compact_step"] = b"0.0625"  # the uniform-step encoding of earlier builds
    with pytest.raises(CacheError, match="shard s-1 uses compact scheme None"):
        BlockCodec.from_schema_metadata(old_scheme, "s-1")
    with pytest.raises(ConfigError, match="mode 'lossy'"):
        BlockCodec(mode="lossy", top_k=4, vocab_size=10)


def test_format_md_recipe_reads_a_written_shard(tmp_path):
    text = FORMAT_MD.read_text(encoding="utf-8")
    match = re.search(r"<!-- recipe -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/FORMAT.md must hold the recipe after a <!-- recipe --> marker"
    namespace: dict = {}
    exec(compile(match.group(1), "FORMAT.md recipe", "exec"), namespace)
    records = synthetic_records(40, top_k=6, vocab_size=700, seed=3)
    with ShardWriter(tmp_path, "train", top_k=6, vocab_size=700, block_positions=60) as writer:
        for record in records:
            writer.write(record)
    (info,) = writer.close()
    assert pa.ipc.open_file(tmp_path / "shards" / info.name).num_record_batches > 2
    rows = list(namespace["read_exact_shard"](tmp_path / "shards" / info.name))
    for written, (sequence_id, input_ids, positions, ids, logprobs, tail) in zip(
        records, rows, strict=True
    ):
        lp16 = stored_logprobs(written.topk_logprobs)
        order = canonical_order(written.topk_ids, lp16)
        assert sequence_id == written.sequence_id
        np.testing.assert_array_equal(input_ids, written.input_ids)
        np.testing.assert_array_equal(positions, written.positions)
        np.testing.assert_array_equal(ids, np.take_along_axis(written.topk_ids, order, 1))
        np.testing.assert_array_equal(logprobs, np.take_along_axis(lp16, order, 1))
        np.testing.assert_array_equal(tail, written.tail_mass)


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_empty_records_and_fully_padded_rows(mode):
    from kdcache.cache.records import SequenceRecord

    ids = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 0]], np.int32)
    inf = -np.inf
    logprobs = np.array([[-0.125, -2.5, inf], [inf, inf, inf], [-0.25, inf, inf]], np.float32)
    record = SequenceRecord(
        sequence_id=5,
        input_ids=np.arange(4, dtype=np.int32),
        topk_ids=ids,
        topk_logprobs=logprobs,
        tail_mass=np.array([0.25, 1.0, 0.0], np.float32),
        positions=np.array([0, 2, 3], np.int32),
    )
    empty = SequenceRecord(
        sequence_id=6,
        input_ids=np.arange(2, dtype=np.int32),
        topk_ids=np.zeros((0, 3), np.int32),
        topk_logprobs=np.zeros((0, 3), np.float32),
        tail_mass=np.zeros(0, np.float32),
        positions=np.zeros(0, np.int32),
    )
    codec = BlockCodec(mode=mode, top_k=3, vocab_size=5)
    first, got, last = codec.decode(codec.encode([empty, record, empty]))
    assert (first.sequence_id, got.sequence_id, last.sequence_id) == (6, 5, 6)
    assert first.topk_ids.shape == (0, 3) and last.input_ids.tolist() == [0, 1]
    np.testing.assert_array_equal(got.topk_ids, ids)
    np.testing.assert_array_equal(got.positions, record.positions)
    np.testing.assert_array_equal(got.tail_mass, record.tail_mass)  # fp16-exact values
    if mode == "exact":
        np.testing.assert_array_equal(got.topk_logprobs, logprobs)
    else:  # each entry at the compact level nearest to its distance below the row's top-1
        top = np.float16(logprobs[:, :1]).astype(np.float32)
        top[~np.isfinite(top)] = 0.0  # fully padded row: nothing stored
        nearest = np.abs((top - logprobs)[..., None] - COMPACT_LEVELS).argmin(-1)
        expected = np.where(np.isfinite(logprobs), top - COMPACT_LEVELS[nearest], -np.inf)
        np.testing.assert_array_equal(got.topk_logprobs, expected)
