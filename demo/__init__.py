"""The embedded demo: a tiny teacher, its tokenizer and a dataset from the CPython standard library.

Public API (cheap to import, no side effects):

* :func:`demo_teacher_dir` - the shipped teacher (``save_pretrained`` dir with its tokenizer).
* :func:`write_demo_dataset` - the held-out ``demo`` split of the stdlib corpus as jsonl.
* :func:`demo_student_config_path` - a Llama config a fraction of the teacher's size.
* :data:`DEFAULT_CACHE_DIR`, :data:`DEFAULT_RUN_DIR` - where the defaults write.
* :data:`DEMO_BUILD_SETTINGS` - ``BuildConfig`` fields of the demo cache (top_k, max_length, holdout).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_DEMO_DIR",
    "DEFAULT_RUN_DIR",
    "DEMO_BUILD_SETTINGS",
    "demo_student_config_path",
    "demo_teacher_dir",
    "write_demo_dataset",
]

DEFAULT_DEMO_DIR = Path("kdcache-demo")
DEFAULT_CACHE_DIR = DEFAULT_DEMO_DIR / "cache"
DEFAULT_RUN_DIR = DEFAULT_DEMO_DIR / "runs"

# BuildConfig fields the demo cache is built with (``kdcache demo`` and ``kdcache build`` with no
# --teacher/--data should agree, so that one reuses the other's cache instead of refusing it).
DEMO_BUILD_SETTINGS: dict[str, int | float] = {"top_k": 64, "max_length": 256, "holdout": 0.1}

_HERE = Path(__file__).resolve().parent


def demo_teacher_dir() -> Path:
    """The shipped demo teacher: a directory ``AutoModelForCausalLM`` / ``AutoTokenizer`` load.

    Raises ``ConfigError`` if the package was installed without its weights.
    """
    path = _HERE / "teacher"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        from kdcache.cache.errors import ConfigError

        raise ConfigError(
            f"the demo teacher is missing from {path}; reinstall kdcache "
            "(or train it: python -m kdcache.demo.train_teacher --out demo/teacher)"
        )
    return path


def demo_student_config_path() -> Path:
    """``demo/student_config.json``: a ``LlamaConfig`` for the demo student (teacher's tokenizer)."""
    return _HERE / "student_config.json"


def write_demo_dataset(
    path: Path, max_tokens: int | None = None, *, chunk_chars: int = 4000
) -> Path:
    """Write the held-out ``demo`` split (stdlib files the teacher never saw) as jsonl.

    Each line is ``{"text": ...}``: one piece of at most ``chunk_chars`` characters of one file,
    cut at line boundaries, in sorted-path order. ``max_tokens`` caps the total size, estimated as
    characters / 3.5 (about what the demo tokenizer does on Python code). The file is written
    atomically (temp name, then rename); ``path`` may be a file or a directory (then
    ``demo.jsonl`` inside it). Returns the file written.
    """
    from kdcache.demo import corpus

    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = path / "demo.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    max_chars = None if max_tokens is None else int(max_tokens * 3.5)
    written = 0
    fd, tmp = tempfile.mkstemp(prefix=".demo-", suffix=".jsonl.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for text in corpus.iter_texts("demo"):
                for piece in corpus.chunk_text(text, chunk_chars):
                    if max_chars is not None and written >= max_chars:
                        break
                    f.write(json.dumps({"text": piece}) + "\n")
                    written += len(piece)
                if max_chars is not None and written >= max_chars:
                    break
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
