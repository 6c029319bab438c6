"""The shard encoding: blocks of sequences <-> one Arrow row of zstd-compressed byte blobs.

A shard is an Arrow IPC file. Each row is a *block* of whole sequences (a few thousand positions)
whose top-k data are stored as zstd-compressed byte blobs, laid out for compression:

* only the valid entries of each row are stored (``k`` column: how many per position; an absent
  entry is the padding convention ``id 0, logprob -inf`` at the end of the row);
* the ids of one position are sorted ascending and delta-encoded (the first one absolute), then
  split into little-endian byte planes (all low bytes, then all next bytes ...);
* the log-probs are stored in that same id order (``exact``: fp16 bit patterns in two byte planes;
  ``compact``: a uint8 level per entry for its distance below the row's top-1, on a table whose
  steps grow with the distance, plus the top-1 as fp16),
  so the reader recovers probability order by a stable sort on the log-prob, descending;
* ``positions`` are delta-encoded per sequence (all ones for plain text), ``tail_mass`` is float32
  (``exact``) or float16 (``compact``) split into byte planes.

Rows returned by the reader are in *canonical order*: log-prob descending, ties by ascending id.
docs/FORMAT.md is the specification; this module is its reference implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import zstandard

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.records import SequenceRecord

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MODES = ("exact", "compact")
ZSTD_LEVEL = 3
# compact mode: log p_i = log p_top1 - COMPACT_LEVELS[q_i]. The levels start in steps of
# COMPACT_STEP nats and then grow geometrically (each step COMPACT_GROWTH times the distance so
# far) up to COMPACT_MAX_BELOW nats: an entry's KL share is about p_i * error^2, so entries far
# below the top-1 (small p_i) can take coarser steps. Measured on the demo teacher at k = 64:
# 84.7 B/token and mean KL 3.6e-4 nats, against 100.4 and 5.8e-5 for uniform 1/16-nat steps.
COMPACT_STEP = 1.0 / 16.0
COMPACT_GROWTH = 0.06
COMPACT_MAX_BELOW = 24.0
COMPACT_SCHEME = f"geometric:{COMPACT_STEP!r}:{COMPACT_GROWTH!r}:{COMPACT_MAX_BELOW!r}"


def _compact_levels() -> np.ndarray:
    """The compact-mode table: level q -> nats below the top-1, float32 (L,) ascending, L <= 256.

    Built in Python floats (IEEE double, the same on every platform), then cast once.
    """
    levels = [0.0]
    while levels[-1] < COMPACT_MAX_BELOW and len(levels) < 256:
        levels.append(levels[-1] + max(COMPACT_STEP, COMPACT_GROWTH * levels[-1]))
    return np.asarray(levels, dtype=np.float32)


COMPACT_LEVELS = _compact_levels()
# compact mode: entries past this cumulative probability (of the whole distribution) are dropped
COMPACT_KEEP_MASS = 0.9999

SCHEMA = pa.schema(
    [
        ("sequence_id", pa.list_(pa.int64())),
        ("num_tokens", pa.list_(pa.int32())),
        ("num_positions", pa.list_(pa.int32())),
        ("input_ids", pa.binary()),
        ("positions", pa.binary()),
        ("k", pa.binary()),
        ("topk_ids", pa.binary()),
        ("topk_logprobs", pa.binary()),
        ("tail_mass", pa.binary()),
    ]
)
# topk+tail mode (codec.tail_samples > 0): s sampled tail ids per row (ascending, delta-coded,
# byte planes) and their log-probs (fp16 bit patterns, two byte planes), in the same id order
TAIL_FIELDS = [("tail_ids", pa.binary()), ("tail_logprobs", pa.binary())]


@dataclass(frozen=True)
class BlockCodec:
    """Encodes / decodes one block for a shard's settings (mode, top_k, vocab_size)."""

    mode: str
    top_k: int
    vocab_size: int
    level: int = ZSTD_LEVEL
    tail_samples: int = 0  # topk+tail mode: sampled tail ids stored per position (0 = none)

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.top_k < 0 or (self.top_k == 0 and not self.tail_samples):
            problems.append(
                f"top_k must be >= 1 (or 0 with tail samples: a sampled cache), got {self.top_k}"
            )
        if self.vocab_size < 1 or self.top_k > self.vocab_size:
            problems.append(f"vocab_size {self.vocab_size} must be >= top_k {self.top_k}")
        if not 0 <= self.tail_samples <= 255:
            problems.append(f"tail_samples must be in [0, 255], got {self.tail_samples}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def id_planes(self) -> int:
        """Bytes needed for an id delta (at most vocab_size - 1)."""
        return max(1, (int(self.vocab_size - 1).bit_length() + 7) // 8)

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of this codec's blocks (SCHEMA, plus TAIL_FIELDS with tail samples)."""
        return pa.schema([*SCHEMA, *TAIL_FIELDS]) if self.tail_samples else SCHEMA

    @property
    def count_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.top_k <= 255 else np.uint16)

    def schema_metadata(self) -> dict[bytes, bytes]:
        """Key/value metadata stored in each shard's Arrow schema."""
        meta = {
            "format_version": str(FORMAT_VERSION),
            "mode": self.mode,
            "top_k": str(self.top_k),
            "vocab_size": str(self.vocab_size),
            "id_planes": str(self.id_planes),
            "codec": "zstd",
        }
        if self.mode == "compact":
            meta["compact_scheme"] = COMPACT_SCHEME
        if self.tail_samples:
            meta["tail_samples"] = str(self.tail_samples)
        return {key.encode(): value.encode() for key, value in meta.items()}

    @classmethod
    def from_schema_metadata(cls, metadata: dict[bytes, bytes] | None, shard: str) -> BlockCodec:
        """The codec of a shard; CacheError for an unknown format version or mode."""
        meta = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        version = meta.get("format_version")
        if version is None or int(version) not in SUPPORTED_FORMAT_VERSIONS:
            raise CacheError(
                f"shard {shard} has format_version {version}, this kdcache reads "
                f"{SUPPORTED_FORMAT_VERSIONS}: upgrade kdcache or rebuild the cache"
            )
        mode = meta.get("mode")
        if mode not in MODES:
            raise CacheError(
                f"shard {shard} uses storage mode {mode!r}, this kdcache knows "
                f"{', '.join(MODES)}: upgrade kdcache or rebuild the cache"
            )
        if mode == "compact" and meta.get("compact_scheme") != COMPACT_SCHEME:
            raise CacheError(
                f"shard {shard} uses compact scheme {meta.get('compact_scheme')!r}, this kdcache "
                f"reads {COMPACT_SCHEME!r}: rebuild the cache with this version"
            )
        return cls(
            mode=mode,
            top_k=int(meta["top_k"]),
            vocab_size=int(meta["vocab_size"]),
            tail_samples=int(meta.get("tail_samples", "0")),
        )

    # ------------------------------------------------------------------ encode
    def encode(self, records: list[SequenceRecord]) -> pa.RecordBatch:
        """Encode whole sequences into one Arrow row (a block)."""
        compressor = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
        pack = compressor.compress
        input_ids = np.concatenate([r.input_ids for r in records]).astype("<i4", copy=False)
        position_deltas = np.concatenate(
            [np.diff(r.positions.astype(np.int64), prepend=-1) for r in records]
        ).astype("<i4")
        ids = np.concatenate([r.topk_ids for r in records])  # (P, k)
        logprobs = np.concatenate([r.topk_logprobs for r in records]).astype(np.float32)
        tail = np.concatenate([r.tail_mass for r in records]).astype(np.float32)
        if self.mode == "compact":
            ids, logprobs, tail = _drop_small(ids, logprobs, tail)
        counts, flat_ids, flat_lp = _to_id_order(ids, logprobs)
        deltas = np.diff(flat_ids, prepend=0)
        starts = np.cumsum(counts) - counts
        starts = starts[counts > 0]
        deltas[starts] = flat_ids[starts]
        if self.mode == "exact":
            lp_blob = _planes(flat_lp.astype(np.float16).view("<u2"), 2)
            tail_blob = _planes(tail.astype("<f4").view("<u4"), 4)
        else:
            lp_blob = _compact_logprobs(counts, flat_lp)
            tail_blob = _planes(tail.astype(np.float16).view("<u2"), 2)
        arrays = [
            _list_row(np.array([r.sequence_id for r in records], np.int64), pa.int64()),
            _list_row(np.array([r.num_tokens for r in records], np.int32), pa.int32()),
            _list_row(np.array([r.num_positions for r in records], np.int32), pa.int32()),
            _binary_row(pack(input_ids.tobytes())),
            _binary_row(pack(position_deltas.tobytes())),
            _binary_row(pack(counts.astype(self.count_dtype).tobytes())),
            _binary_row(pack(_planes(deltas.astype("<u4"), self.id_planes))),
            _binary_row(pack(lp_blob)),
            _binary_row(pack(tail_blob)),
        ]
        if self.tail_samples:
            arrays += [_binary_row(pack(blob)) for blob in self._encode_tail(records)]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _encode_tail(self, records: list[SequenceRecord]) -> tuple[bytes, bytes]:
        """Tail samples of every row sorted by id, delta-coded (first absolute); fp16 log-probs."""
        ids = np.concatenate([r.tail_ids for r in records]).astype(np.int64)  # (P, s)
        logprobs = np.concatenate([r.tail_logprobs for r in records]).astype(np.float32)
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        logprobs = np.take_along_axis(logprobs, order, axis=1)
        deltas = np.diff(ids, axis=1, prepend=0).reshape(-1)  # row starts stay absolute
        return (
            _planes(deltas.astype("<u4"), self.id_planes),
            _planes(logprobs.reshape(-1).astype(np.float16).view("<u2"), 2),
        )

    def _decode_tail(self, batch: pa.RecordBatch, row: int, num_rows: int):
        """(num_rows, s) int32 ids and float32 log-probs of a block's tail samples."""
        unpack = zstandard.ZstdDecompressor().decompress
        shape = (num_rows, self.tail_samples)
        raw_ids = unpack(batch.column("tail_ids")[row].as_buffer())
        deltas = _unplanes(raw_ids, self.id_planes, "<u4").astype(np.int64)
        raw_lp = unpack(batch.column("tail_logprobs")[row].as_buffer())
        bits = _unplanes(raw_lp, 2, "<u2")
        if deltas.shape[0] != num_rows * self.tail_samples or bits.shape[0] != deltas.shape[0]:
            raise ValueError("tail sample columns disagree with the block's rows")
        ids = np.cumsum(deltas.reshape(shape), axis=1).astype(np.int32)
        return ids, bits.view(np.float16).astype(np.float32).reshape(shape)

    # ------------------------------------------------------------------ decode
    def decode(self, batch: pa.RecordBatch, row: int = 0) -> list[SequenceRecord]:
        """Decode one block row back into records (vectorized; no per-position Python loop)."""
        unpack = zstandard.ZstdDecompressor().decompress
        column = batch.column
        sequence_ids = _list_values(column("sequence_id"), row, np.int64)
        num_tokens = _list_values(column("num_tokens"), row, np.int32).astype(np.int64)
        num_positions = _list_values(column("num_positions"), row, np.int32).astype(np.int64)
        input_ids = np.frombuffer(unpack(column("input_ids")[row].as_buffer()), "<i4")
        position_deltas = np.frombuffer(unpack(column("positions")[row].as_buffer()), "<i4")
        counts = np.frombuffer(unpack(column("k")[row].as_buffer()), self.count_dtype)
        num_rows, num_entries = counts.shape[0], int(counts.sum(dtype=np.int64))
        deltas = _unplanes(unpack(column("topk_ids")[row].as_buffer()), self.id_planes, "<u4")
        lp_raw = unpack(column("topk_logprobs")[row].as_buffer())
        tail_raw = unpack(column("tail_mass")[row].as_buffer())
        if deltas.shape[0] != num_entries or position_deltas.shape[0] != num_rows:
            raise ValueError("block column lengths disagree")

        # ids: per-row cumulative sum of the deltas (first delta of a row is absolute)
        running = np.cumsum(deltas, dtype=np.int64)
        row_of = np.repeat(np.arange(num_rows), counts)
        starts = np.cumsum(counts, dtype=np.int64) - counts
        nonempty = counts > 0
        base = np.zeros(num_rows, np.int64)
        base[nonempty] = running[starts[nonempty]] - deltas[starts[nonempty]]
        flat_ids = (running - base[row_of]).astype(np.int32)
        if self.mode == "exact":
            bits = _unplanes(lp_raw, 2, "<u2")
            flat_lp = bits.view(np.float16).astype(np.float32)
            # order key: ascending key = descending fp16 value (+0 and -0 tie)
            order_key = np.where(bits >= 0x8000, bits, 0x7FFF - bits.astype(np.int32))
            order_key[bits == 0x8000] = 0x7FFF
            tail = _unplanes(tail_raw, 4, "<u4").view("<f4")
        else:
            flat_lp, order_key = _decode_compact_logprobs(lp_raw, counts, num_entries)
            tail = _unplanes(tail_raw, 2, "<u2").view(np.float16).astype(np.float32)

        # each row sorted by (key, column in id order): log-prob descending, ties by id ascending
        column_of = np.arange(num_entries, dtype=np.int64) - starts[row_of]
        entry_keys = (order_key.astype(np.uint32) << 16) | column_of.astype(np.uint32)
        if num_entries == num_rows * self.top_k:  # no padding: rows are already dense
            keys = entry_keys.reshape(num_rows, self.top_k)
        else:
            keys = np.full((num_rows, self.top_k), 0xFFFFFFFF, np.uint32)  # padding sorts last
            keys[row_of, column_of] = entry_keys
        keys.sort(axis=1)
        valid = keys != 0xFFFFFFFF
        source = np.where(valid, starts[:, None] + (keys & 0xFFFF), 0)
        if num_entries:
            dense_ids = np.where(valid, flat_ids[source], 0).astype(np.int32)
            dense_lp = np.where(valid, flat_lp[source], -np.inf).astype(np.float32)
        else:
            dense_ids = np.zeros((num_rows, self.top_k), np.int32)
            dense_lp = np.full((num_rows, self.top_k), -np.inf, np.float32)

        positions = _per_sequence_cumsum(position_deltas, num_positions)
        tail_ids = tail_lp = None
        if self.tail_samples:
            tail_ids, tail_lp = self._decode_tail(batch, row, num_rows)
        token_ends = np.cumsum(num_tokens)
        row_ends = np.cumsum(num_positions)
        records = []
        for index, sequence_id in enumerate(sequence_ids.tolist()):
            t0, t1 = token_ends[index] - num_tokens[index], token_ends[index]
            r0, r1 = row_ends[index] - num_positions[index], row_ends[index]
            records.append(
                SequenceRecord(
                    sequence_id=int(sequence_id),
                    # copies: writable, and a record kept in a shuffle buffer does not pin
                    # its whole block in memory
                    input_ids=input_ids[t0:t1].copy(),
                    topk_ids=dense_ids[r0:r1].copy(),
                    topk_logprobs=dense_lp[r0:r1].copy(),
                    tail_mass=tail[r0:r1].copy(),
                    positions=positions[r0:r1].copy(),
                    tail_ids=None if tail_ids is None else tail_ids[r0:r1].copy(),
                    tail_logprobs=None if tail_lp is None else tail_lp[r0:r1].copy(),
                )
            )
        return records


def canonical_order(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> np.ndarray:
    """(M, k) permutation that puts each row in the reader's order: log-prob desc, ties by id asc.

    Use it to compare a written record with what the reader returns when log-probs tie.
    """
    by_id = np.argsort(topk_ids, axis=1, kind="stable")
    lp_by_id = np.take_along_axis(topk_logprobs, by_id, axis=1)
    by_lp = np.argsort(-lp_by_id, axis=1, kind="stable")
    return np.take_along_axis(by_id, by_lp, axis=1)


def stored_logprobs(topk_logprobs: np.ndarray, mode: str = "exact") -> np.ndarray:
    """(M, k) float32 log-probs as the ``exact`` reader returns them: fp16-rounded."""
    if mode != "exact":
        raise ConfigError("stored_logprobs reproduces the exact mode only")
    return topk_logprobs.astype(np.float16).astype(np.float32)


def synthetic_records(
    num_records: int,
    *,
    top_k: int,
    vocab_size: int,
    seed: int = 0,
    max_tokens: int = 64,
    chat_every: int = 3,
    pad_fraction: float = 0.3,
) -> list[SequenceRecord]:
    """Random but valid records for tests and benchmarks (not realistic distributions).

    Lengths vary in [1, max_tokens]; every ``chat_every``-th record stores only some positions
    (M < T, possibly 0); a ``pad_fraction`` of rows keeps fewer than ``top_k`` entries (padding
    convention: id 0, log-prob -inf at the end of the row). Rows are sorted by log-prob, descending.
    """
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_records):
        num_tokens = int(rng.integers(1, max_tokens + 1))
        if chat_every and index % chat_every == chat_every - 1:
            count = int(rng.integers(0, num_tokens + 1))
            positions = np.sort(rng.choice(num_tokens, count, replace=False))
        else:
            positions = np.arange(num_tokens)
        rows = positions.shape[0]
        scores = rng.random((rows, vocab_size)).argsort(axis=1)[:, :top_k] if rows else None
        ids = np.zeros((rows, top_k), np.int64) if scores is None else scores
        probs = (
            rng.dirichlet(np.full(top_k + 1, 0.3), size=rows) if rows else np.zeros((0, top_k + 1))
        )
        head = -np.sort(-probs[:, :top_k], axis=1)
        logprobs = np.log(np.maximum(head, 1e-30)).astype(np.float32)
        kept = np.where(rng.random(rows) < pad_fraction, rng.integers(1, top_k + 1, rows), top_k)
        pad = np.arange(top_k)[None, :] >= kept[:, None]
        ids = np.where(pad, 0, ids)
        logprobs = np.where(pad, -np.inf, logprobs).astype(np.float32)
        tail = np.clip(1.0 - np.exp(logprobs.astype(np.float64)).sum(axis=1), 0.0, 1.0)
        records.append(
            SequenceRecord(
                sequence_id=index,
                input_ids=rng.integers(0, vocab_size, num_tokens).astype(np.int32),
                topk_ids=ids.astype(np.int32),
                topk_logprobs=logprobs,
                tail_mass=tail.astype(np.float32),
                positions=positions.astype(np.int32),
            )
        )
    return records


# ---------------------------------------------------------------------- helpers
def _to_id_order(ids: np.ndarray, logprobs: np.ndarray):
    """Valid entries of each row sorted by id: counts (P,), flat ids (E,), flat log-probs (E,)."""
    valid = logprobs.astype(np.float16) > -np.inf  # -inf (also after fp16 rounding) = absent
    columns = np.arange(ids.shape[1], dtype=np.int64)
    keys = np.where(valid, ids.astype(np.int64) << 16, np.int64(1) << 62) | columns  # (P, k)
    keys.sort(axis=1)  # by id, then by original column (a stable order, duplicates included)
    order = keys & 0xFFFF
    kept = keys < (np.int64(1) << 62)
    flat_ids = (keys[kept] >> 16).astype(np.int64)
    flat_lp = np.take_along_axis(logprobs, order, axis=1)[kept]
    return kept.sum(axis=1), flat_ids, flat_lp


def _drop_small(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray):
    """compact: drop entries past cumulative mass COMPACT_KEEP_MASS; their mass joins the tail."""
    probs = np.exp(logprobs.astype(np.float64))  # (P, k), rows sorted descending
    before = np.cumsum(probs, axis=1) - probs  # mass strictly before each entry
    drop = before >= COMPACT_KEEP_MASS
    drop[:, :1] = False  # the top-1 always stays (a sampled cache, k = 0, has no entries)
    if not drop.any():
        return ids, logprobs, tail
    tail = (tail.astype(np.float64) + np.where(drop, probs, 0.0).sum(axis=1)).astype(np.float32)
    return np.where(drop, 0, ids), np.where(drop, -np.inf, logprobs).astype(np.float32), tail


def _compact_logprobs(counts: np.ndarray, flat_lp: np.ndarray) -> bytes:
    """top-1 log-prob per non-empty row as fp16 (2 planes), then the uint8 level of each entry."""
    nonempty = counts > 0
    starts = (np.cumsum(counts) - counts)[nonempty]
    top16 = (
        np.maximum.reduceat(flat_lp, starts).astype(np.float16)
        if starts.size
        else np.zeros(0, np.float16)
    )
    top_of_row = np.zeros(counts.shape[0], np.float32)
    top_of_row[nonempty] = top16.astype(np.float32)
    below = np.repeat(top_of_row, counts) - flat_lp  # (entries,) nats below the top-1, >= 0
    midpoints = (COMPACT_LEVELS[1:] + COMPACT_LEVELS[:-1]) / 2
    levels = np.searchsorted(midpoints, below.astype(np.float32)).astype(np.uint8)  # nearest
    return _planes(top16.view("<u2"), 2) + levels.tobytes()


def _decode_compact_logprobs(raw: bytes, counts: np.ndarray, num_entries: int):
    """Flat float32 log-probs and their order key (the uint8 level: larger = less likely)."""
    nonempty = np.flatnonzero(counts > 0)
    split = 2 * nonempty.shape[0]
    top = _unplanes(raw[:split], 2, "<u2").view(np.float16).astype(np.float32)
    levels = np.frombuffer(raw[split:], np.uint8)
    if levels.shape[0] != num_entries:
        raise ValueError("compact log-prob blob has the wrong length")
    if levels.size and int(levels.max()) >= COMPACT_LEVELS.shape[0]:
        raise ValueError("compact log-prob blob has a level outside the table")
    top_of_row = np.zeros(counts.shape[0], np.float32)
    top_of_row[nonempty] = top
    logprobs = np.repeat(top_of_row, counts) - COMPACT_LEVELS[levels]
    return logprobs.astype(np.float32), levels


def _binary_row(blob: bytes) -> pa.Array:
    """A one-element binary array, built from buffers (``pa.array`` would import pandas)."""
    offsets = pa.py_buffer(np.array([0, len(blob)], np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(blob)])


def _list_row(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A one-element list<value_type> array holding ``values`` (built from buffers)."""
    child = pa.Array.from_buffers(value_type, len(values), [None, pa.py_buffer(values)])
    offsets = pa.py_buffer(np.array([0, len(values)], np.int32))
    return pa.Array.from_buffers(pa.list_(value_type), 1, [None, offsets], children=[child])


def _list_values(array: pa.ListArray, row: int, dtype: type) -> np.ndarray:
    """Values of one row of a list<int> column, read from its buffers (``to_numpy`` would import
    pandas, seconds of start-up in every DataLoader worker)."""
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset :]
    child = array.values
    values = np.frombuffer(child.buffers()[1], dtype)[child.offset :]
    return values[offsets[row] : offsets[row + 1]]


def _planes(values: np.ndarray, num_planes: int) -> bytes:
    """Little-endian byte planes: all byte-0s, then all byte-1s ... (first num_planes bytes)."""
    values = np.ascontiguousarray(values)
    as_bytes = values.view(np.uint8).reshape(values.shape[0], values.dtype.itemsize)
    return np.ascontiguousarray(as_bytes[:, :num_planes].T).tobytes()


def _unplanes(raw: bytes, num_planes: int, dtype: str) -> np.ndarray:
    """Inverse of ``_planes``: little-endian integers of ``dtype`` from their byte planes."""
    planes = np.frombuffer(raw, np.uint8)
    if planes.shape[0] % num_planes:
        raise ValueError("byte-plane blob length is not a multiple of the plane count")
    planes = planes.reshape(num_planes, -1)
    out = planes[0].astype(dtype)
    for index in range(1, num_planes):
        out |= planes[index].astype(dtype) << (8 * index)
    return out


def _per_sequence_cumsum(deltas: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at every sequence (first delta is relative to -1)."""
    running = np.cumsum(deltas, dtype=np.int64)
    previous_end = np.cumsum(lengths) - lengths
    offsets = np.zeros(lengths.shape[0], np.int64)
    has_previous = previous_end > 0
    offsets[has_previous] = running[previous_end[has_previous] - 1]
    return (running - np.repeat(offsets, lengths) - 1).astype(np.int32)
