"""Reading a cache: ``open_cache(path) -> Cache``, checksum-verified streaming of records."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdcache.cache.errors import CacheError
from kdcache.cache.format.blocks import BlockCodec
from kdcache.cache.format.manifest import read_manifest
from kdcache.cache.format.shards import ShardInfo
from kdcache.cache.records import SequenceRecord
from kdcache.cache.storage.location import resolve_location
from kdcache.cache.storage.remote_cache import prepare_remote
from kdcache.cache.storage.shard_sources import ADVICE, DEFAULT_PREFETCH, LocalShards


class Cache:
    """A validated cache (use ``open_cache``), local or remote.

    ``manifest`` is the parsed manifest.json, ``splits`` the split names, ``shards(split)`` the
    shards of a split in stored order (by rank, then index), ``read_shard(info)`` the records of
    one shard, ``read_shards(infos)`` those of several in order (a remote cache fetches ahead)
    and ``sequences(split)`` all records of a split in stored order. ``location`` is the path or
    URL it was opened from; ``path`` a local directory holding its manifest.json and tokenizer/
    (the cache itself, or for a remote cache its copy in the read-through directory).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: dict[str, Any],
        source: Any = None,
        location: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.location = location or str(self.path)
        self.source = source if source is not None else LocalShards(self.path)
        self._shards = [ShardInfo.from_dict(entry) for entry in manifest["shards"]]
        self._expected = BlockCodec.from_manifest(manifest).settings()  # every shard's settings

    def __repr__(self) -> str:
        return f"Cache({self.location!r}, splits={self.splits})"

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def shards(self, split: str = "train") -> list[ShardInfo]:
        """Shards of ``split`` sorted by (rank, index); CacheError for an unknown split."""
        if split not in self.manifest["splits"]:
            raise CacheError(
                f"cache {self.location} has no split {split!r}; its splits are: "
                f"{', '.join(self.splits) or '(none)'}"
            )
        return sorted(
            (info for info in self._shards if info.split == split),
            key=lambda info: (info.rank, info.index),
        )

    def read_shard(self, info: ShardInfo, verify: bool = True) -> Iterator[SequenceRecord]:
        """Records of one shard in stored order.

        With ``verify`` (default) the whole file's size and sha256 are checked before decoding
        (a remote shard is checked as it downloads); without it only the zstd frame checksums
        inside the blocks guard the data (faster). A bad shard raises CacheError naming it.
        """
        yield from self._decode(info, self.source.load(info, verify))

    def read_shards(
        self, infos: Iterable[ShardInfo], verify: bool = True
    ) -> Iterator[Iterator[SequenceRecord]]:
        """One record iterator per shard of ``infos``, in that order; a remote cache downloads
        the next shards in the background while the current one is read."""
        for info, data in self.source.load_many(infos, verify):
            yield self._decode(info, data)

    def check_shard(self, info: ShardInfo) -> str | None:
        """None when the stored shard is sound, else a short reason (missing, size, checksum)."""
        return self.source.check(info)

    def _decode(self, info: ShardInfo, data: Any) -> Iterator[SequenceRecord]:
        try:
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(data)))
            codec = BlockCodec.from_schema_metadata(reader.schema.metadata, info.name)
        except CacheError:
            raise
        except Exception as error:  # pyarrow raises several types for damaged files
            raise _corrupt(info, error) from None
        _check_settings(codec, self._expected, info.name)
        for batch_index in range(reader.num_record_batches):
            try:
                batch = reader.get_batch(batch_index)
                records = [r for row in range(batch.num_rows) for r in codec.decode(batch, row)]
            except Exception as error:
                raise _corrupt(info, error) from None
            yield from records

    def sequences(self, split: str = "train", verify: bool = True) -> Iterator[SequenceRecord]:
        """All records of ``split``, streaming shard by shard in stored order."""
        for records in self.read_shards(self.shards(split), verify=verify):
            yield from records


def open_cache(
    path: str | os.PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: str | int | None = None,
    prefetch: int = DEFAULT_PREFETCH,
) -> Cache:
    """Open a finished cache: a local directory or an fsspec URL (``s3://bucket/prefix``).

    CacheError when it is missing, unfinished or unknown; ConfigError for an unknown URL scheme or
    a filesystem that is not installed. For a URL: ``storage_options`` go to fsspec (endpoint,
    credentials), shards are read through ``cache_dir`` (default ``~/.cache/kdcache/remote``)
    bounded by ``cache_limit`` (bytes or e.g. "20GiB"), ``prefetch`` shards ahead.
    """
    location = resolve_location(path, storage_options)
    if not location.is_remote:
        return Cache(location.local_path, read_manifest(location.local_path))
    local, manifest, source = prepare_remote(location, cache_dir, cache_limit, prefetch)
    return Cache(local, manifest, source=source, location=location.url)


def check_shard(cache_dir: str | os.PathLike, info: ShardInfo) -> str | None:
    """None when the shard file of a local cache is sound, else a short reason."""
    return LocalShards(Path(cache_dir)).check(info)


def _corrupt(info: ShardInfo, error: Exception) -> CacheError:
    return CacheError(f"shard {info.name} is corrupt ({type(error).__name__}: {error}): {ADVICE}")


def _check_settings(codec: BlockCodec, expected: dict[str, Any], shard: str) -> None:
    """CacheError when a shard's column groups were written with other settings than the
    manifest's (top_k, vocab_size, mode, tail_samples ...: whatever each group stands for)."""
    found = codec.settings()
    differ = sorted(
        key for key in found.keys() | expected.keys() if found.get(key) != expected.get(key)
    )
    if differ:
        held = ", ".join(f"{key} {found.get(key, 'none')}" for key in differ)
        said = ", ".join(f"{key} {expected.get(key, 'none')}" for key in differ)
        raise CacheError(
            f"shard {shard} holds {held}, the manifest says {said}: the shard belongs to "
            "another build; rebuild the cache"
        )
