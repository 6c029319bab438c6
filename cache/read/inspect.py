"""What is in a cache: the manifest in readable form plus statistics of the stored distributions.

``inspect_cache`` answers "which k do I need?" from the cache itself. For every position of a
sample it computes, from the stored values only:

- the top-k mass ``sum_i exp(topk_logprobs[i])`` (padding entries are ``-inf`` and count 0) and the
  stored tail mass;
- the mass that a smaller k' would have kept: the same sum over the first k' entries, for
  k' = 1, 2, 4, ... up to k (k itself always included);
- the teacher entropy over the *stored support*: the k entries plus the tail bucket as one extra
  outcome, renormalized to sum to 1 (rounded values rarely sum to exactly 1). It is a lower bound
  of the teacher's full-vocabulary entropy; ``entropy_upper`` adds ``tail * log(V - n)`` (the tail
  spread uniformly over the ``V - n`` tokens not stored), an upper bound. Both in nats.

Sampling (``full=False``): the shards of every split are visited in an order drawn from ``seed``;
whole shards are read until at least ``sample_positions`` positions are gathered, then exactly
``sample_positions`` of them are kept by a seeded uniform draw without replacement. The result is
deterministic for a given cache and seed. Positions of one shard come from neighbouring data, so a
sample of a few shards is less varied than an i.i.d. draw over the whole cache; use ``full=True``
(every position; about ``4 * (log2(k) + 5)`` bytes of memory per position) for exact numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.records import SequenceRecord

PERCENTILES: tuple[int, ...] = (1, 5, 25, 50, 75, 95, 99)
HISTOGRAM_BINS = 40


@dataclass
class Distribution:
    """Mean and percentiles (``PERCENTILES``, numpy's linear interpolation) of one quantity."""

    mean: float
    percentiles: dict[int, float]

    @classmethod
    def of(cls, values: np.ndarray) -> Distribution:
        """Summarize a (N,) array (N >= 1)."""
        values = np.asarray(values, dtype=np.float64)
        points = np.percentile(values, PERCENTILES)
        return cls(
            mean=float(values.mean()),
            percentiles={p: float(v) for p, v in zip(PERCENTILES, points, strict=True)},
        )


@dataclass
class Histogram:
    """Counts of values in ``len(edges) - 1`` equal bins (the last bin includes its right edge)."""

    edges: list[float]
    counts: list[int]

    @classmethod
    def of(cls, values: np.ndarray, low: float, high: float) -> Histogram:
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(low, high))
        return cls(edges=[float(e) for e in edges], counts=[int(c) for c in counts])


@dataclass
class PositionStats:
    """Statistics over the sampled positions of one split (or of all splits)."""

    num_positions: int
    topk_mass: Distribution  # sum of the stored top-k probabilities
    tail_mass: Distribution  # the stored tail mass
    entropy: Distribution  # nats, over top-k + tail bucket (a lower bound of the full entropy)
    entropy_upper: Distribution  # nats, tail spread uniformly over the unstored tokens
    kept_mass: dict[int, Distribution]  # k' -> mass of the first k' entries
    topk_mass_histogram: Histogram  # over [0, 1]
    entropy_histogram: Histogram  # over [0, log(V)] (log(k + 1) when V is not recorded)
    entropy_upper_histogram: Histogram  # same bins


@dataclass
class SplitInfo:
    """What the shards of one split hold."""

    name: str
    shards: int
    sequences: int
    tokens: int
    positions: int
    bytes: int


@dataclass
class CacheReport:
    """Everything ``kdcache inspect`` prints; ``to_dict()`` is its JSON form."""

    path: str
    summary: dict[str, Any]  # readable manifest fields, in display order (None when not recorded)
    splits: list[SplitInfo]
    sample: dict[str, Any]  # how the positions were chosen: full, seed, requested, shards_read
    stats: PositionStats | None  # all sampled positions; None when the cache stores none
    split_stats: dict[str, PositionStats] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)  # the raw manifest, less its shard list
    # the teacher's own next-token CE on the holdout from the observed log-probs (None: the
    # cache has no such column or no holdout); see ``teacher_holdout``
    teacher: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (percentile keys become strings in JSON)."""
        return _jsonable(asdict(self))


def inspect_cache(
    path: str | Path | Any,
    *,
    sample_positions: int = 100_000,
    full: bool = False,
    seed: int = 0,
) -> CacheReport:
    """Summarize a cache: its manifest and statistics of its stored teacher distributions.

    Args:
        path: a cache directory (opened with ``open_cache``, which raises ``CacheError`` for a
            missing or incomplete cache), or an already opened cache object with ``manifest``,
            ``shards(split)`` and ``read_shard(info)``.
        sample_positions: how many positions to sample when ``full`` is False (>= 1).
        full: read every position of every split instead of a sample.
        seed: seed of the shard order and of the draw of positions.

    Returns:
        A ``CacheReport``; ``report.stats`` is None when the cache holds no positions or is a
        sampled cache (top-k 0).
    """
    if sample_positions < 1:
        raise ConfigError(f"--sample must be at least 1 position, got {sample_positions}")
    cache = _open(path) if isinstance(path, str | Path) else path
    manifest = dict(cache.manifest)
    split_names = _split_names(manifest)
    shards = [(name, info) for name in split_names for info in cache.shards(name)]
    splits = [_split_info(name, [i for n, i in shards if n == name]) for name in split_names]
    if manifest.get("top_k") is None:
        raise CacheError(
            f"{path}: the manifest records no top_k; rebuild the cache with kdcache build"
        )
    top_k = int(manifest["top_k"])
    vocab_size = int(manifest.get("vocab_size") or 0)
    k_primes = kprime_values(top_k)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(shards)) if not full else np.arange(len(shards))
    if not k_primes:  # no top-k entries stored (a sampled cache): no top-k mass to summarize
        order = order[:0]
    columns: list[np.ndarray] = []  # (M, len(k_primes) + 3) per record, float32
    labels: list[np.ndarray] = []  # (M,) split index per record
    gathered, shards_read = 0, 0
    for shard_index in order:
        if not full and gathered >= sample_positions:
            break
        name, info = shards[int(shard_index)]
        for record in cache.read_shard(info):
            rows = position_rows(record, k_primes, vocab_size)
            columns.append(rows)
            labels.append(np.full(len(rows), split_names.index(name), dtype=np.int16))
            gathered += len(rows)
        shards_read += 1

    table = np.concatenate(columns) if columns else np.zeros((0, len(k_primes) + 3), np.float32)
    split_of = np.concatenate(labels) if labels else np.zeros(0, np.int16)
    if not full and len(table) > sample_positions:
        keep = np.sort(rng.choice(len(table), size=sample_positions, replace=False))
        table, split_of = table[keep], split_of[keep]

    max_entropy = math.log(vocab_size) if vocab_size > top_k else math.log(top_k + 1)
    stats = _position_stats(table, k_primes, max_entropy)
    split_stats = {}
    for index, name in enumerate(split_names):
        part = _position_stats(table[split_of == index], k_primes, max_entropy)
        if part is not None:
            split_stats[name] = part
    return CacheReport(
        path=str(getattr(cache, "location", getattr(cache, "path", path))),
        summary=manifest_summary(manifest, splits),
        splits=splits,
        sample={
            "full": full,
            "seed": seed,
            "requested_positions": None if full else sample_positions,
            "sampled_positions": len(table),
            "shards_read": shards_read,
            "shards_total": len(shards),
            "k_primes": k_primes,
        },
        stats=stats,
        split_stats=split_stats,
        manifest={k: v for k, v in manifest.items() if k != "shards"},  # shards: see `splits`
        teacher=teacher_holdout(cache, manifest),
    )


def teacher_holdout(cache: Any, manifest: dict[str, Any], split: str = "holdout") -> dict | None:
    """The teacher's own next-token cross-entropy on ``split``, from the observed log-probs.

    Every stored position of the split with a next token counts (the whole split is read: the
    holdout is a small share of a cache). Returns ``{"split", "positions", "ce_nats",
    "bits_per_token", "perplexity", "temperature"}`` (at the cache temperature: the teacher's
    own perplexity when it is 1), or None when the cache has no observed column or the split
    holds no position.
    """
    if not manifest.get("observed_logprobs") or split not in (manifest.get("splits") or {}):
        return None
    total, count = 0.0, 0
    for info in cache.shards(split):
        for record in cache.read_shard(info):
            values = record.observed_logprobs
            if values is None:
                continue
            known = values[np.isfinite(values)].astype(np.float64)
            total -= float(known.sum())
            count += int(known.size)
    if count == 0:
        return None
    ce = total / count
    return {
        "split": split,
        "positions": count,
        "ce_nats": ce,
        "bits_per_token": ce / math.log(2.0),
        "perplexity": math.exp(ce),
        "temperature": manifest.get("temperature"),
    }


def kprime_values(top_k: int) -> list[int]:
    """k' = 1, 2, 4, ... below ``top_k``, then ``top_k`` itself (none for top_k = 0)."""
    values, k = [], 1
    while k < top_k:
        values.append(k)
        k *= 2
    return [*values, top_k] if top_k else []


def position_rows(record: SequenceRecord, k_primes: list[int], vocab_size: int) -> np.ndarray:
    """Per-position statistics of one record, float32 (M, len(k_primes) + 3).

    Columns: kept mass at each k', then tail mass, entropy over top-k + bucket, upper entropy.
    """
    logprobs = np.asarray(record.topk_logprobs, dtype=np.float64)  # (M, k)
    probs = np.exp(logprobs)  # (M, k), padding (-inf) -> 0
    cumulative = np.concatenate([np.zeros((len(probs), 1)), np.cumsum(probs, axis=1)], axis=1)
    width = probs.shape[1]
    kept = cumulative[:, [min(k, width) for k in k_primes]]  # (M, len(k_primes))
    tail = np.clip(np.asarray(record.tail_mass, dtype=np.float64), 0.0, 1.0)  # (M,)
    total = cumulative[:, -1] + tail  # (M,)
    total = np.where(total > 0, total, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = probs / total[:, None]  # (M, k) renormalized
        t = tail / total  # (M,)
        entropy = -(_xlogx(p).sum(axis=1) + _xlogx(t))  # (M,)
    stored = np.isfinite(logprobs).sum(axis=1)  # (M,) entries actually stored
    unseen = np.maximum(vocab_size - stored, 1) if vocab_size else np.ones_like(stored)
    upper = entropy + t * np.log(unseen)  # (M,)
    return np.column_stack([kept, tail, entropy, upper]).astype(np.float32)


def manifest_summary(manifest: dict[str, Any], splits: list[SplitInfo]) -> dict[str, Any]:
    """The manifest fields a person asks about first, in display order; None when not recorded."""
    tokens = _first(manifest, "num_tokens") or sum(s.tokens for s in splits) or None
    num_bytes = sum(s.bytes for s in splits) or _first(manifest, "bytes", "num_bytes") or None
    build = _first(manifest, "build", "build_stats", "stats")
    throughput = _first(manifest, "tokens_per_s", "tokens_per_second", "throughput")
    if throughput is None and isinstance(build, dict):
        throughput = _first(build, "tokens_per_s", "tokens_per_second", "throughput")
    return {
        "format_version": _first(manifest, "format_version"),
        "teacher": _describe(_first(manifest, "teacher")),
        "tokenizer": _describe(_first(manifest, "tokenizer_fingerprint", "tokenizer")),
        "vocab_size": _first(manifest, "vocab_size"),
        "data": _describe(_first(manifest, "data", "dataset", "data_source")),
        "top_k": _first(manifest, "top_k"),
        "mode": _first(manifest, "mode"),
        "encoding": _encoding(manifest),
        "temperature": _first(manifest, "temperature"),
        "settings": _settings(_first(manifest, "settings", "build_settings")),
        "splits": ", ".join(s.name for s in splits) or None,
        "sequences": _first(manifest, "num_sequences") or sum(s.sequences for s in splits),
        "tokens": tokens,
        "positions": sum(s.positions for s in splits),
        "bytes": num_bytes,
        "bytes_per_token": round(num_bytes / tokens, 2) if num_bytes and tokens else None,
        "build_tokens_per_s": throughput,
        "created": " ".join(
            str(v) for v in (manifest.get("created_at"), manifest.get("kdcache_version")) if v
        )
        or None,
    }


def _open(path: str | Path) -> Any:
    from kdcache.cache.read.reader import open_cache  # lands with the storage layer

    return open_cache(path)


def _position_stats(
    table: np.ndarray, k_primes: list[int], max_entropy: float
) -> PositionStats | None:
    if len(table) == 0:
        return None
    count = len(k_primes)
    topk_mass = table[:, count - 1]
    return PositionStats(
        num_positions=len(table),
        topk_mass=Distribution.of(topk_mass),
        tail_mass=Distribution.of(table[:, count]),
        entropy=Distribution.of(table[:, count + 1]),
        entropy_upper=Distribution.of(table[:, count + 2]),
        kept_mass={k: Distribution.of(table[:, j]) for j, k in enumerate(k_primes)},
        topk_mass_histogram=Histogram.of(topk_mass, 0.0, 1.0),
        entropy_histogram=Histogram.of(table[:, count + 1], 0.0, max_entropy),
        entropy_upper_histogram=Histogram.of(table[:, count + 2], 0.0, max_entropy),
    )


def _split_names(manifest: dict[str, Any]) -> list[str]:
    splits = manifest.get("splits") or ["train"]
    if isinstance(splits, dict):
        return [str(name) for name in splits]
    if isinstance(splits, str):
        return [splits]
    return [str(s["name"]) if isinstance(s, dict) else str(s) for s in splits]


def _split_info(name: str, infos: list[Any]) -> SplitInfo:
    def total(attribute: str) -> int:
        return int(sum(getattr(info, attribute, 0) or 0 for info in infos))

    return SplitInfo(
        name=name,
        shards=len(infos),
        sequences=total("num_sequences"),
        tokens=total("num_tokens"),
        positions=total("num_positions"),
        bytes=total("bytes"),
    )


def _first(mapping: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    return None


def _encoding(manifest: dict[str, Any]) -> str:
    """What the cache's encoding stores (``mode`` absent: a cache older than the key, exact)."""
    from kdcache.cache.format.codecs import describe_encoding

    return describe_encoding(str(manifest.get("mode") or "exact"))


def _describe(value: Any) -> Any:
    """A short readable form of a manifest entry: name/path/source first, hashes shortened."""
    if not isinstance(value, dict):
        return _short(value)
    for key in ("name", "name_or_path", "path", "source", "id"):
        if value.get(key) is not None:
            rest = {k: v for k, v in value.items() if k != key and not isinstance(v, dict | list)}
            details = ", ".join(f"{k}={_short(v)}" for k, v in rest.items())
            return f"{value[key]} ({details})" if details else str(value[key])
    return ", ".join(f"{k}={_short(v)}" for k, v in value.items() if not isinstance(v, dict | list))


def _settings(value: Any) -> Any:
    """The build settings that shape the stored positions, when the manifest has them as a dict."""
    if not isinstance(value, dict):
        return _describe(value)
    shown = ("max_length", "pack", "dtype", "holdout", "limit", "text_field", "messages_field")
    parts = [f"{k}={value[k]}" for k in shown if value.get(k) is not None]
    if value.get("tail_samples"):  # topk+tail mode: sampled tail ids per position
        parts.append(f"tail_samples={value['tail_samples']}")
    return ", ".join(parts) or None


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 16 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a hash: the first 12 hex digits identify it
    return value


def _xlogx(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, values * np.log(np.where(values > 0, values, 1.0)), 0.0)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
