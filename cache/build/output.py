"""Where ``build_cache`` writes: a local directory, or a URL through a local staging directory.

``LocalTarget`` is the cache directory itself (what the build always did). ``RemoteTarget`` builds
in a local staging directory (one per URL and rank, under ``<cache home>/staging``) with the same
writer, journal and lock, and uploads as it goes::

    shard finished locally (temp + fsync + rename + journal, checksummed)
      -> upload <url>/shards/<name>.arrow, then its journal <url>/shards/<name>.json
      -> delete the staged copy
    all ranks done (barrier) -> rank 0 uploads tokenizer/, then manifest.json last (commit point)

A remote shard counts as complete only when its journal exists and the object has the journal's
size; the journal is uploaded after the object and deleted before an object is replaced, so a
build killed at any moment (during an upload too) resumes from the remote's complete shards plus
any staged shards not yet uploaded, and ends with the records of an uninterrupted build. The
remote is the truth: a staging directory whose build state differs from the remote's is reset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kdcache.cache.build.fingerprint import differences
from kdcache.cache.build.lock import (
    FINGERPRINT_KEYS,
    STATE_NAME,
    TOKENIZER_DIR,
    BuildLock,
    prepare_directory,
    remove_cache_files,
)
from kdcache.cache.build.slices import (
    PARTS_DIR,
    marker_bytes,
    marker_name,
    parse_markers,
    read_local_markers,
    read_state,
)
from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.format import shards as shard_files
from kdcache.cache.format.manifest import (
    MANIFEST_NAME,
    ShardInfo,
    atomic_write_bytes,
    file_checksum,
    manifest_path,
)
from kdcache.cache.format.shards import SHARDS_DIR
from kdcache.cache.storage.location import (
    Location,
    cache_home,
    check_bucket,
    remote_errors,
    upload_tree,
)
from kdcache.cache.storage.remote_lock import RemoteLock

UPLOAD_PAUSE_ENV = "KDCACHE_TEST_PAUSE_IN_UPLOAD"  # tests: seconds between a shard and its journal


def check_writable(out: Path) -> None:
    """ConfigError when ``out`` (or its nearest existing parent) cannot be written."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: no write permission in {existing}; choose another --out")


class LocalTarget:
    """A build into a local directory: every method is what the build did before URLs."""

    def __init__(self, out: Path, rank: int) -> None:
        self.local_dir, self.display, self.rank = out, str(out), rank

    def check_writable(self) -> None:
        check_writable(self.local_dir)

    def lock(self) -> contextlib.AbstractContextManager:
        return BuildLock(self.local_dir, self.rank)

    owned: set[int] | None = None  # the row groups this process builds (None: all)

    def prepare(
        self, state: dict[str, Any], overwrite: bool, creator: bool, exclusive: bool = False
    ) -> str:
        """ "complete", "resume" or "fresh" (``lock.prepare_directory``); ``creator``: this process
        may write the build state (torchrun: rank 0 first; slices: all, ``exclusive``)."""
        return prepare_directory(
            self.local_dir, state, overwrite and creator, write_state=creator, exclusive=exclusive
        )

    def complete_groups(self) -> dict[int, list[str]]:
        """``{group: shard names}`` of the row groups with a completion marker."""
        return read_local_markers(self.local_dir)

    def mark_group(self, group: int, shard_names: list[str]) -> None:
        """Write a row group's completion marker (after its shards are where readers look)."""
        (self.local_dir / PARTS_DIR).mkdir(exist_ok=True)
        atomic_write_bytes(
            self.local_dir / PARTS_DIR / marker_name(group), marker_bytes(group, shard_names)
        )

    def save_tokenizer(self, tokenizer) -> None:
        """The teacher's tokenizer into the cache (every slice: the same files)."""
        tokenizer.save_pretrained(self.local_dir / TOKENIZER_DIR)

    def read_state(self) -> dict[str, Any]:
        """The build state of an unfinished build (``--finalize``)."""
        return read_state(self.local_dir)

    def complete_shards(self) -> list[ShardInfo]:
        return shard_files.list_complete_shards(self.local_dir)

    def publish(self, info: ShardInfo) -> None:
        """Called by the shard writer after each complete shard (nothing to do locally)."""

    def flush(self) -> None:
        """Wait until every published shard is where readers look for it."""

    def commit(self) -> None:
        """After manifest.json is written into ``local_dir``: make it visible (local: it is)."""


class RemoteTarget(LocalTarget):
    """A build into ``location`` (a URL), staged in ``staging/<url hash>/rank<r>``."""

    def __init__(self, location: Location, rank: int, staging: Path | None = None) -> None:
        key = hashlib.sha256(location.url.encode()).hexdigest()[:16]
        root = staging if staging is not None else cache_home() / "staging"
        super().__init__(root / key / f"rank{rank}", rank)
        self.location, self.display = location, location.url
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-upload")
        self._pending: list[Future] = []

    def check_writable(self) -> None:
        check_bucket(self.location, "checking the build's --out")
        super().check_writable()

    def lock(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(BuildLock(self.local_dir, self.rank))  # builders on this machine
        stack.enter_context(RemoteLock(self.location, self.rank))  # builders anywhere
        stack.callback(self._drain)  # runs first: no upload outlives the lock
        return stack

    def prepare(
        self, state: dict[str, Any], overwrite: bool, creator: bool, exclusive: bool = False
    ) -> str:
        """Mirror the remote's manifest / build state into staging, then decide as locally.

        A slice (``exclusive``) creates the remote build state only where there is none, and
        reads it back: of two slices that start at once with other settings, one is refused.
        """
        overwrite = overwrite and creator
        had_state = self._sync_down(overwrite)
        status = super().prepare(state, overwrite, creator, exclusive=False)
        if status == "fresh" and creator and (not exclusive or overwrite or not had_state):
            if not exclusive or overwrite:
                self._reset_remote()
            self._put_state(exclusive)
        if status == "resume":
            self._upload_staged()
        return status

    def _put_state(self, exclusive: bool) -> None:
        staged = (self.local_dir / STATE_NAME).read_bytes()
        fs = self.location.filesystem()
        remote = self.location.child(STATE_NAME)
        with remote_errors(self.location, "writing the build state"):
            if exclusive and fs.exists(remote):
                current = fs.cat_file(remote)
            else:
                fs.pipe_file(remote, staged)
                current = fs.cat_file(remote)
        if current == staged:
            return
        ours, theirs = json.loads(staged), json.loads(current)
        changed = differences(
            {k: theirs.get(k) for k in FINGERPRINT_KEYS}, {k: ours.get(k) for k in FINGERPRINT_KEYS}
        )
        if changed or theirs.get("num_shards") != ours.get("num_shards"):
            remove_cache_files(self.local_dir)
            raise ConfigError(
                f"{self.location.url} was started at the same moment by a build with other "
                f"settings ({'; '.join(changed) or 'num_shards'}); use another --out"
            )
        (self.local_dir / STATE_NAME).write_bytes(current)  # the first slice's state rules

    def complete_groups(self) -> dict[int, list[str]]:
        """Completion markers under ``<url>/parts``."""
        fs = self.location.filesystem()
        directory = self.location.child(PARTS_DIR)
        with remote_errors(self.location, "listing completion markers"):
            if not fs.exists(directory):
                return {}
            names = [p for p in fs.ls(directory, detail=False, refresh=True) if p.endswith(".json")]
            contents = fs.cat(names) if names else {}
        return parse_markers(contents)

    def mark_group(self, group: int, shard_names: list[str]) -> None:
        """After the group's uploads: one small object, ``<url>/parts/g<group>.json``."""
        self.flush()
        fs = self.location.filesystem()
        with remote_errors(self.location, f"writing the marker of row group {group}"):
            fs.pipe_file(
                self.location.child(PARTS_DIR, marker_name(group)), marker_bytes(group, shard_names)
            )

    def save_tokenizer(self, tokenizer) -> None:
        super().save_tokenizer(tokenizer)
        upload_tree(self.location, self.local_dir / TOKENIZER_DIR, TOKENIZER_DIR)

    def read_state(self) -> dict[str, Any]:
        self._sync_down(False)
        return super().read_state()

    def complete_shards(self) -> list[ShardInfo]:
        """Remote shards whose journal exists and whose object has the journal's size."""
        fs = self.location.filesystem()
        directory = self.location.child(SHARDS_DIR)
        with remote_errors(self.location, "listing shards"):
            if not fs.exists(directory):
                return []
            entries = fs.ls(directory, detail=True, refresh=True)
            sizes = {entry["name"].rsplit("/", 1)[-1]: entry["size"] for entry in entries}
            journals = [entry["name"] for entry in entries if entry["name"].endswith(".json")]
            contents = fs.cat(journals) if journals else {}
        shards = []
        for raw in contents.values():
            with contextlib.suppress(ValueError, CacheError):
                info = ShardInfo.from_dict(json.loads(raw))
                if sizes.get(info.name) == info.bytes:
                    shards.append(info)
        return sorted(shards, key=lambda info: (info.split, info.rank, info.index))

    def publish(self, info: ShardInfo) -> None:
        self._pending.append(self._uploads.submit(self._upload_shard, info))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises an upload's CacheError

    def _drain(self) -> None:
        """Wait for queued uploads (after an error too: their shards are complete)."""
        pending, self._pending = self._pending, []
        for future in pending:
            with contextlib.suppress(Exception):
                future.result()

    def commit(self) -> None:
        """Upload tokenizer/ then manifest.json, last: the commit point."""
        upload_tree(self.location, self.local_dir / TOKENIZER_DIR, TOKENIZER_DIR)
        self._put_file(manifest_path(self.local_dir), MANIFEST_NAME)
        self.clean_staging()

    # ------------------------------------------------------------------ internals
    def _upload_shard(self, info: ShardInfo) -> None:
        """Object first, then its journal (a journal always describes a whole object)."""
        local = self.local_dir / SHARDS_DIR / info.name
        journal = local.with_suffix(".json")
        fs = self.location.filesystem()
        remote_journal = self.location.child(SHARDS_DIR, journal.name)
        with remote_errors(self.location, f"uploading shard {info.name}"):
            if fs.exists(remote_journal):
                fs.rm_file(remote_journal)  # a stale entry must never describe new data
            fs.put_file(str(local), self.location.child(SHARDS_DIR, info.name))
            if pause := float(os.environ.get(UPLOAD_PAUSE_ENV, "0") or 0):
                time.sleep(pause)
            fs.pipe_file(remote_journal, journal.read_bytes())
        local.unlink()
        journal.unlink()

    def _upload_staged(self) -> None:
        """Upload staged shards of this rank a killed run finished but did not upload."""
        remote = {info.name: info for info in self.complete_shards()}
        for info in shard_files.list_complete_shards(self.local_dir):
            staged = self.local_dir / SHARDS_DIR / info.name
            if self.owned is not None and info.rank not in self.owned:
                staged.unlink()  # a row group another process builds now: it writes its shards
                staged.with_suffix(".json").unlink()
            elif remote.get(info.name) == info:
                staged.unlink()
                staged.with_suffix(".json").unlink()
            elif file_checksum(staged) == info.checksum:
                self._upload_shard(info)
            else:
                staged.unlink()  # damaged on disk: the build computes it again

    def _sync_down(self, overwrite: bool) -> bool:
        """Make the staging directory's manifest and build state those of the remote; whether
        the remote has a build state."""
        self.local_dir.mkdir(parents=True, exist_ok=True)
        fs = self.location.filesystem()
        with remote_errors(self.location, "reading the build state"):
            remote = {
                name: fs.cat_file(self.location.child(name))
                if fs.exists(self.location.child(name))
                else None
                for name in (MANIFEST_NAME, STATE_NAME)
            }
            orphans = remote[STATE_NAME] is None and fs.exists(self.location.child(SHARDS_DIR))
        if remote[MANIFEST_NAME] is None and orphans and not overwrite:
            raise ConfigError(
                f"the shards in {self.location.url} carry no build fingerprints, so this build "
                "cannot resume them; use another --out or pass --overwrite to replace them"
            )
        staged_state = self.local_dir / STATE_NAME
        if (staged_state.read_bytes() if staged_state.is_file() else None) != remote[STATE_NAME]:
            remove_cache_files(self.local_dir)  # staged work of another (or no) remote build
            if remote[STATE_NAME] is not None:
                staged_state.write_bytes(remote[STATE_NAME])
        manifest = manifest_path(self.local_dir)
        manifest.unlink(missing_ok=True)
        if remote[MANIFEST_NAME] is not None:
            manifest.write_bytes(remote[MANIFEST_NAME])
        return remote[STATE_NAME] is not None

    def _reset_remote(self) -> None:
        """Delete kdcache's own objects under the URL (manifest first); nothing else."""
        fs = self.location.filesystem()
        with remote_errors(self.location, "removing the previous build"):
            if fs.exists(self.location.child(MANIFEST_NAME)):
                fs.rm_file(self.location.child(MANIFEST_NAME))
            doomed = [
                path
                for sub in (SHARDS_DIR, TOKENIZER_DIR, PARTS_DIR)
                if fs.exists(self.location.child(sub))
                for path in fs.find(self.location.child(sub))
            ]
            if fs.exists(self.location.child(STATE_NAME)):
                doomed.append(self.location.child(STATE_NAME))
            if doomed:
                fs.rm(doomed)

    def _put_file(self, local: Path, *parts: str) -> None:
        fs = self.location.filesystem()
        with remote_errors(self.location, f"uploading {'/'.join(parts)}"):
            fs.put_file(str(local), self.location.child(*parts))

    def clean_staging(self) -> None:
        """Remove the staging directory after a committed build."""
        shutil.rmtree(self.local_dir, ignore_errors=True)


def build_target(location: Location, rank: int, staging: Path | None = None) -> LocalTarget:
    """The target of a build's ``--out``: ``RemoteTarget`` for a URL, else ``LocalTarget``."""
    if location.is_remote:
        return RemoteTarget(location, rank, staging)
    return LocalTarget(location.local_path, rank)
