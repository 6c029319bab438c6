"""The demo corpus: CPython standard library sources, split deterministically by file.

Every machine with Python has these files. The split is decided by a hash of each file's path
relative to the stdlib root, so it is the same on every machine with the same Python version
(other versions ship slightly different files; the split rule is unchanged, the contents differ).

Splits (by ``sha256(relative_path) % 100``):

* ``teacher-train`` (0-89): the demo teacher and its tokenizer are trained on these files.
* ``teacher-val`` (90-94): held-out perplexity of the teacher.
* ``demo`` (95-99): held-out files the teacher never saw; the demo cache is built from them.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

SPLITS: tuple[str, ...] = ("teacher-train", "teacher-val", "demo")

# Directory names (any depth) that are skipped: test suites, IDLE, vendored / generated code.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",  # mostly generated charmap tables
        "pydoc_data",  # one huge generated string table
        "turtledemo",
        "ensurepip",
        "lib-dynload",
    }
)


def stdlib_root() -> Path:
    """The directory holding this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """Which split a file belongs to, from a hash of its '/'-separated path relative to the root."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < 90:
        return "teacher-train"
    if bucket < 95:
        return "teacher-val"
    return "demo"


def _skipped(rel_parts: tuple[str, ...]) -> bool:
    if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel_parts[:-1]):
        return True
    return rel_parts[-1].startswith("_sysconfigdata")


def list_files(split: str, root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of one split (``teacher-train``, ``teacher-val`` or ``demo``)."""
    if split not in SPLITS:
        from kdcache.cache.errors import ConfigError

        raise ConfigError(f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")
    root = stdlib_root() if root is None else Path(root)
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune skipped folders (site-packages can hold tens of thousands of files)
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.endswith(".py") or not path.is_file():
                continue
            rel = path.relative_to(root)
            if _skipped(rel.parts):
                continue
            rel_s = rel.as_posix()
            if split_of(rel_s) == split:
                out.append((rel_s, path))
    out.sort(key=lambda item: item[0])
    return [path for _, path in out]


def read_source(path: Path) -> str | None:
    """A file's text (UTF-8), or None for files that do not decode or are empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def iter_texts(split: str, root: Path | None = None) -> list[str]:
    """The texts of one split, in sorted-path order (files that do not decode are skipped)."""
    texts = []
    for path in list_files(split, root):
        text = read_source(path)
        if text is not None:
            texts.append(text)
    return texts


def chunk_text(text: str, max_chars: int = 4000) -> list[str]:
    """Split a text into pieces of at most ``max_chars``, at line boundaries where possible."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # a single huge line: hard split
            if current:
                pieces.append("".join(current))
                current, size = [], 0
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]
