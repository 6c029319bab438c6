"""Golden digests of the shard encoding: proof that a refactor of the codecs keeps the bytes.

``tests/format_golden.json`` was written by ``python tests/format_golden.py --write`` with the
encoder of commit b7736fd (``cache/format/blocks.py`` before it was split into ``cache/format/codecs/``), and
``tests/test_codecs.py`` recomputes the digests with the current encoder. A digest covers, for
each case below, the Arrow schema (names and types), the schema metadata (keys in order), the
list columns and the sha256 of every binary column *after* zstd decompression: the compressed
bytes also depend on the installed libzstd, the payload only on kdcache. Every blob is checked to be one zstd frame
with a content size and a checksum (what FORMAT.md specifies).

The inputs use only ``Generator.integers`` and exactly representable values (log-probs on a grid
of 1/128 nat, tail mass on 1/4096), so that they are the same on every platform; their own sha256
is stored too, so a changed input generator fails with its own message, not as a format change.

``--shard-files`` prints the sha256 of whole shard files instead. To compare them byte for byte
with the old encoder in one environment: ``git archive b7736fd | tar -x -C /tmp/old``, copy this
file to ``/tmp/old/tests/``, link ``/tmp/ns/kdcache/cache`` to ``/tmp/old/cache`` and run it from
``/tmp/old`` with ``PYTHONPATH=/tmp/ns:/tmp/old``; then run it here and diff the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import zstandard

from kdcache.cache.format.blocks import BlockCodec
from kdcache.cache.records import SequenceRecord

GOLDEN_PATH = Path(__file__).with_name("format_golden.json")

# name -> (mode, top_k, vocab_size, tail_samples): every column layout the format has
CASES: dict[str, tuple[str, int, int, int]] = {
    "exact-k8-v50": ("exact", 8, 50, 0),  # one id plane
    "exact-k8-v3000": ("exact", 8, 3000, 0),  # two id planes
    "exact-k300-v70000": ("exact", 300, 70000, 0),  # three id planes, uint16 counts
    "compact-k8-v3000": ("compact", 8, 3000, 0),  # with dropped entries
    "exact-k8-s4-v3000": ("exact", 8, 3000, 4),  # top-k + tail samples
    "exact-k0-s5-v3000": ("exact", 0, 3000, 5),  # sampled cache
    "compact-k0-s5-v3000": ("compact", 0, 3000, 5),  # sampled cache, compact tail mass
}


def golden_records(top_k: int, vocab_size: int, tail_samples: int, seed: int = 7):
    """Five records: plain text and chat-style positions, padding, ties, sharp rows, samples."""
    rng = np.random.Generator(np.random.PCG64(seed))
    records = []
    for index, num_tokens in enumerate([9, 1, 14, 6, 11]):
        if index % 3 == 2:  # chat: only some positions stored
            positions = np.flatnonzero(rng.integers(0, 2, num_tokens)).astype(np.int32)
        else:
            positions = np.arange(num_tokens, dtype=np.int32)
        rows = positions.shape[0]
        ids = np.stack([rng.permutation(vocab_size)[:top_k] for _ in range(rows)])
        ids = ids.reshape(rows, top_k).astype(np.int32)
        grid = np.sort(rng.integers(64, 2000, (rows, top_k)), axis=1)  # ties included
        logprobs = (-grid / 128.0).astype(np.float32)  # (M, k) descending
        if top_k:
            logprobs[::3, 0] = np.float32(-1.0 / 16384.0)  # sharp rows: compact drops entries
            kept = np.where(rng.integers(0, 3, rows) == 0, rng.integers(1, top_k + 1, rows), top_k)
            pad = np.arange(top_k)[None, :] >= kept[:, None]
            ids = np.where(pad, 0, ids).astype(np.int32)
            logprobs = np.where(pad, -np.inf, logprobs).astype(np.float32)
        tail_mass = (rng.integers(0, 4097, rows) / 4096.0).astype(np.float32)
        if not top_k:
            tail_mass = np.ones(rows, np.float32)
        record = SequenceRecord(
            sequence_id=100 + index,
            input_ids=rng.integers(0, vocab_size, num_tokens).astype(np.int32),
            topk_ids=ids,
            topk_logprobs=logprobs,
            tail_mass=tail_mass,
            positions=positions,
        )
        if tail_samples:
            record.tail_ids = rng.integers(0, vocab_size, (rows, tail_samples)).astype(np.int32)
            tail_lp = (-rng.integers(128, 3000, (rows, tail_samples)) / 128.0).astype(np.float32)
            absent = rng.integers(0, 5, (rows, tail_samples)) == 0
            record.tail_ids[absent] = 0
            tail_lp[absent] = -np.inf
            record.tail_logprobs = tail_lp
        records.append(record)
    return records


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inputs_digest(records: list[SequenceRecord]) -> str:
    digest = hashlib.sha256()
    for record in records:
        for array in (
            record.input_ids,
            record.positions,
            record.topk_ids,
            record.topk_logprobs,
            record.tail_mass,
            record.tail_ids,
            record.tail_logprobs,
        ):
            if array is not None:
                digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def encoded_digest(codec: BlockCodec, records: list[SequenceRecord]) -> dict:
    """Schema, metadata, list columns and decompressed-payload sha256s of two encoded blocks."""
    blocks = [codec.encode(records[:2]), codec.encode(records[2:])]
    schema = [(field.name, str(field.type)) for field in blocks[0].schema]
    metadata = [[k.decode(), v.decode()] for k, v in codec.schema_metadata().items()]  # in order
    columns = []
    for batch in blocks:
        row = {}
        for field in batch.schema:
            value = batch.column(field.name)[0]
            if field.type.equals(pa.binary()):
                blob = value.as_py()
                payload = zstandard.ZstdDecompressor().decompress(blob)
                params = zstandard.get_frame_parameters(blob)
                if not params.has_checksum or params.content_size != len(payload):
                    raise AssertionError(f"{field.name}: not a checksummed, sized zstd frame")
                row[field.name] = _sha(payload)
            else:
                row[field.name] = value.as_py()
        columns.append(row)
    return {"schema": schema, "metadata": metadata, "blocks": columns}


def compute_golden() -> dict:
    golden = {}
    for name, (mode, top_k, vocab_size, tail_samples) in CASES.items():
        records = golden_records(top_k, vocab_size, tail_samples)
        codec = BlockCodec(mode, top_k=top_k, vocab_size=vocab_size, tail_samples=tail_samples)
        golden[name] = {"inputs": inputs_digest(records), **encoded_digest(codec, records)}
    return golden


def shard_file_digests() -> dict[str, list[str]]:
    """sha256 of the whole shard files ``ShardWriter`` writes for each case (blocks of 7
    positions). Equal across encoders only with the same pyarrow and libzstd: compare the
    output of two checkouts run in one environment."""
    from kdcache.cache.format.shards import SHARDS_DIR, ShardWriter

    digests = {}
    for name, (mode, top_k, vocab_size, tail_samples) in CASES.items():
        with tempfile.TemporaryDirectory() as directory:
            with ShardWriter(
                directory,
                "train",
                top_k=top_k,
                vocab_size=vocab_size,
                mode=mode,
                tail_samples=tail_samples,
                block_positions=7,
            ) as writer:
                for record in golden_records(top_k, vocab_size, tail_samples):
                    writer.write(record)
            files = [Path(directory) / SHARDS_DIR / info.name for info in writer.close()]
            digests[name] = [_sha(path.read_bytes()) for path in files]
    return digests


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN_PATH.name}")
    parser.add_argument(
        "--shard-files", action="store_true", help="print whole-file digests of written shards"
    )
    args = parser.parse_args()
    golden = shard_file_digests() if args.shard_files else compute_golden()
    text = json.dumps(golden, indent=1, sort_keys=True) + "\n"
    if args.write and not args.shard_files:
        GOLDEN_PATH.write_text(text, encoding="utf-8")
    print(text)
