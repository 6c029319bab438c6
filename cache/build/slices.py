"""Elastic builds: the work of a build cut into row groups, done by any number of processes.

A build's rows are cut into row groups (``--group-rows``, cache/build/data.py); a group's records
depend on its rows only, and its shards are named by the group (``<split>-r<group>-<index>``,
the shard format's ``rank`` field holding the group). So the same cache comes out whoever builds
which group, in one process, under torchrun with any number of ranks, or as independent slices:

* ``kdcache build ... --num-shards N --shard-index I`` builds the groups ``g % N == I`` with no
  collective and no shared start: slices run at once or one after another, on one machine or
  many, into a local directory or a URL. The first slice to start writes the build state (an
  exclusive create); every other slice compares its fingerprints with it, so a slice of another
  build's settings is refused before it writes anything.
* When a group is complete (both splits' shards written, uploaded for a URL) its completion
  marker ``parts/g<group>.json`` is written atomically (temp + rename locally; one PUT of a
  small object remotely, after the group's shards): it lists the group's shards. Markers are
  never removed by another slice, so a slice killed at any moment loses at most its open group,
  which a re-run resumes from the group's complete shards.
* After its last group, a slice lists the markers. If every group has one, it writes the
  manifest (the commit point, last). Each slice writes its own marker before it looks, so the
  slice that finishes last always sees every marker: the manifest is never left unwritten (two
  slices finishing together may both write it; the manifests are the same cache's, and the
  write is atomic). ``kdcache build --out DIR --finalize`` writes it from the markers alone
  (no teacher), or names the slices still missing.
* torchrun ranks are slices that meet at the end: rank ``r`` of ``W`` builds ``g % W == r``;
  rank 0 writes the manifest after a barrier. An interrupted build resumes with another number
  of processes: completed groups are skipped, a group in progress resumes from its shards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdcache.cache.errors import CacheError, ConfigError

PARTS_DIR = "parts"  # completion markers, one per row group
_MARKER = re.compile(r"^g(\d+)\.json$")


def slice_problems(num_shards: int | None, shard_index: int | None) -> list[str]:
    """Problems of ``--num-shards`` / ``--shard-index`` (empty: fine or not given)."""
    if num_shards is None and shard_index is None:
        return []
    if num_shards is None or shard_index is None:
        return ["--num-shards and --shard-index go together: pass both (or neither)"]
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        return [f"--num-shards must be >= 1 (got {num_shards})"]
    if isinstance(shard_index, bool) or not isinstance(shard_index, int):
        return [f"--shard-index must be a number (got {shard_index})"]
    if not 0 <= shard_index < num_shards:
        return [
            f"--shard-index {shard_index} is out of range for --num-shards {num_shards}: use "
            f"0..{num_shards - 1}"
        ]
    return []


def marker_name(group: int) -> str:
    """``g<group:06d>.json``: the completion marker of one row group."""
    return f"g{group:06d}.json"


def marker_bytes(group: int, shard_names: Iterable[str]) -> bytes:
    return json.dumps({"group": group, "shards": sorted(shard_names)}, indent=1).encode()


def parse_markers(contents: dict[str, bytes]) -> dict[int, list[str]]:
    """``{group: shard names}`` from ``{file name: marker bytes}`` (unreadable ones skipped)."""
    groups: dict[int, list[str]] = {}
    for name, raw in contents.items():
        match = _MARKER.match(name.rsplit("/", 1)[-1])
        if match is None:
            continue
        try:
            value = json.loads(raw)
            groups[int(value["group"])] = [str(shard) for shard in value["shards"]]
        except (ValueError, KeyError, TypeError):
            continue  # an atomic write cannot tear one; never trust the disk blindly
    return groups


def read_local_markers(out: Path) -> dict[int, list[str]]:
    """The completion markers of a local cache directory."""
    directory = out / PARTS_DIR
    if not directory.is_dir():
        return {}
    return parse_markers({path.name: path.read_bytes() for path in directory.glob("g*.json")})


def missing_groups(num_groups: int, markers: dict[int, list[str]]) -> list[int]:
    return [group for group in range(num_groups) if group not in markers]


def missing_text(missing: list[int], num_shards: int | None) -> str:
    """What is not built yet, by slice when the build runs in slices: one short phrase."""
    if num_shards:
        slices = sorted({group % num_shards for group in missing})
        listed = ", ".join(str(index) for index in slices[:20]) + (
            " ..." if len(slices) > 20 else ""
        )
        return f"slices {listed} of {num_shards} (--shard-index) are not complete"
    listed = ", ".join(str(group) for group in missing[:20]) + (" ..." if len(missing) > 20 else "")
    return f"{len(missing)} row groups are not built (groups {listed})"


def shards_of_markers(markers: dict[int, list[str]], complete: dict[str, Any]) -> list[Any]:
    """The complete shards the markers list, by (split, group, index); CacheError if one is not
    complete (a marker is written only after its shards, so storage lost or hides them)."""
    names = [name for group in sorted(markers) for name in markers[group]]
    absent = [name for name in names if name not in complete]
    if absent:
        raise CacheError(
            f"{len(absent)} shards listed as complete cannot be seen ({absent[0]} ...): --out "
            "must be one directory on a filesystem shared by every rank"
        )
    shards = [complete[name] for name in names]
    return sorted(shards, key=lambda info: (info.split, info.rank, info.index))


def read_state(out: Path) -> dict[str, Any]:
    """The build state of an unfinished build (``--finalize``); ConfigError when there is none."""
    from kdcache.cache.format.manifest import BUILD_STATE_NAME

    path = out / BUILD_STATE_NAME
    if not path.is_file():
        raise ConfigError(
            f"{out} holds no unfinished build (no {BUILD_STATE_NAME}); --finalize needs the "
            "--out of a build run in slices"
        )
    state = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(state.get("partition"), dict) or "manifest" not in state:
        raise ConfigError(
            f"the unfinished build in {out} was started by an older kdcache; re-run its "
            "`kdcache build` command to finish it"
        )
    return state
