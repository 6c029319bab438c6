"""Reading a cache: ``open_cache(path) -> Cache``, checksum-verified streaming of records."""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdcache.cache.errors import CacheError
from kdcache.cache.format import BlockCodec
from kdcache.cache.manifest import read_manifest
from kdcache.cache.records import SequenceRecord
from kdcache.cache.shards import ShardInfo, shard_path


class Cache:
    """A validated cache directory (use ``open_cache``).

    ``manifest`` is the parsed manifest.json, ``splits`` the split names, ``shards(split)`` the
    shards of a split in stored order (by rank, then index), ``read_shard(info)`` the records of
    one shard and ``sequences(split)`` all records of a split in stored order.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._shards = [ShardInfo.from_dict(entry) for entry in manifest["shards"]]
        self._expected = BlockCodec.from_manifest(manifest).settings()  # every shard's settings

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, splits={self.splits})"

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
                f"cache {self.path} has no split {split!r}; its splits are: "
                f"{', '.join(self.splits) or '(none)'}"
            )
        return sorted(
            (info for info in self._shards if info.split == split),
            key=lambda info: (info.rank, info.index),
        )

    def read_shard(self, info: ShardInfo, verify: bool = True) -> Iterator[SequenceRecord]:
        """Records of one shard in stored order.

        With ``verify`` (default) the whole file's size and sha256 are checked before decoding;
        without it only the zstd frame checksums inside the blocks guard the data (faster). A bad
        shard raises CacheError naming the file.
        """
        path = shard_path(self.path, info.name)
        data = _read_checked(path, info, verify)
        try:
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(data)))
            codec = BlockCodec.from_schema_metadata(reader.schema.metadata, info.name)
        except CacheError:
            raise
        except Exception as error:  # pyarrow raises several types for damaged files
            raise _corrupt(path, error) from None
        _check_settings(codec, self._expected, info.name)
        for batch_index in range(reader.num_record_batches):
            try:
                batch = reader.get_batch(batch_index)
                records = [r for row in range(batch.num_rows) for r in codec.decode(batch, row)]
            except Exception as error:
                raise _corrupt(path, error) from None
            yield from records

    def sequences(self, split: str = "train", verify: bool = True) -> Iterator[SequenceRecord]:
        """All records of ``split``, streaming shard by shard in stored order."""
        for info in self.shards(split):
            yield from self.read_shard(info, verify=verify)


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a finished cache directory; CacheError when it is missing, unfinished or unknown."""
    return Cache(path, read_manifest(path))


_ADVICE = "run `kdcache verify` and rebuild the cache"


class _BadShard(CacheError):
    """A shard that fails a check; ``problem`` is the short reason (for ``kdcache verify``)."""

    def __init__(self, info: ShardInfo, problem: str) -> None:
        super().__init__(f"shard {info.name} {problem}: {_ADVICE}")
        self.problem = problem


def check_shard(cache_dir: str | os.PathLike, info: ShardInfo) -> str | None:
    """None when the shard file is sound, else a short reason (missing, size, checksum)."""
    try:
        _read_checked(shard_path(cache_dir, info.name), info, verify=True)
    except _BadShard as error:
        return error.problem
    return None


def _read_checked(path: Path, info: ShardInfo, verify: bool) -> mmap.mmap:
    """The shard's bytes, memory-mapped (page cache, shared between DataLoader workers)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != info.bytes:
                raise _BadShard(
                    info, f"is {size} bytes, the manifest says {info.bytes} (truncated or replaced)"
                )
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise _BadShard(info, f"is missing from {path.parent}") from None
    except (OSError, ValueError) as error:
        raise _BadShard(info, f"cannot be read ({error})") from None
    if verify:
        algorithm, _, expected = info.checksum.partition(":")
        if algorithm != "sha256":
            raise _BadShard(info, f"has an unknown checksum type {algorithm!r}")
        if hashlib.sha256(data).hexdigest() != expected:
            raise _BadShard(info, "fails its sha256 checksum (corrupt)")
    return data


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


def _corrupt(path: Path, error: Exception) -> CacheError:
    return CacheError(f"shard {path.name} is corrupt ({type(error).__name__}: {error}): {_ADVICE}")
