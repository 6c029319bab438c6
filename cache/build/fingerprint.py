"""Fingerprints of what a cache was built from: teacher, tokenizer, data and settings.

A fingerprint is a small JSON-able dict of the facts that decide the cache's contents, plus a
``hash`` over them. Two builds produce the same records exactly when all four fingerprints agree
(paths and names are recorded for people but are not part of the hash: the same teacher copied
elsewhere is the same teacher). ``differences`` names the fields that disagree, for the message
that refuses to mix two different builds in one directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

SMALL_FILE_BYTES = 64 << 20  # hashed in full below this size
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype")
PREPROCESSING_VERSION = 1  # bump when data.py changes how records are made


def stable_hash(value: Any) -> str:
    """sha256 of the canonical JSON of ``value`` (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _with_hash(details: dict[str, Any], hashed_keys: list[str]) -> dict[str, Any]:
    return {**details, "hash": stable_hash({key: details[key] for key in hashed_keys})}


def file_fingerprint(path: Path) -> str:
    """Full sha256 for small files; for large ones the safetensors header (names, dtypes, shapes,
    offsets) or the first and last MiB, plus the size."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= SMALL_FILE_BYTES:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
            return digest.hexdigest()
        digest.update(str(size).encode())
        if path.suffix == ".safetensors":
            header_size = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(min(header_size, 100 << 20)))
            handle.seek(header_size + 8)
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return "partial:" + digest.hexdigest()


def _local_model_dir(teacher: str) -> Path | None:
    path = Path(teacher).expanduser()
    if path.is_dir():
        return path
    try:  # hub id: the snapshot from_pretrained just loaded, if it is in the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(teacher, local_files_only=True))
    except Exception:  # not cached locally (or not a hub id): the commit hash is all we have
        return None


def teacher_fingerprint(teacher: str, model: Any) -> dict[str, Any]:
    """Name, config hash, weight file hashes and (hub ids) the resolved commit of the teacher."""
    config = model.config.to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    directory = _local_model_dir(teacher)
    weights: dict[str, str] = {}
    if directory is not None:
        for file in sorted(directory.iterdir()):
            if file.suffix in _WEIGHT_SUFFIXES and file.is_file():
                weights[file.name] = file_fingerprint(file.resolve())
    commit = getattr(model.config, "_commit_hash", None)
    details = {
        "name": teacher,
        "path": str(directory.resolve()) if directory is not None else None,
        "config": stable_hash(config),
        "weights": stable_hash(weights) if weights else None,
        "weight_files": weights,
        "commit": commit,
    }
    hashed = ["config", "weights"] if weights else ["config", "commit"]
    return _with_hash(details, hashed)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what token ids mean: vocabulary, merges, normalization, special tokens.

    The backend tokenizer's JSON is normalized (runtime padding/truncation settings removed) for
    fast tokenizers; slow ones use their sorted vocabulary. The chat template is *not* part of it
    (a student with another template still means the same strings by the same ids); it is part of
    the data fingerprint, where it changes what the records are.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("padding", None)
        state.pop("truncation", None)
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items())}
    specials = {
        "special_tokens": {
            name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())
        },
        "added": sorted((str(t), i) for t, i in tokenizer.get_added_vocab().items()),
    }
    return stable_hash({"backend": state, **specials})


def tokenizer_details(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's fingerprint plus what a person wants to see about it."""
    return {
        "hash": tokenizer_fingerprint(tokenizer),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "chat_template": stable_hash(tokenizer.chat_template) if tokenizer.chat_template else None,
    }


def data_fingerprint(spec: Any, tokenizer: Any, rows: Any) -> dict[str, Any]:
    """Source, split, fields, row count, preprocessing settings and (local files) content hashes."""
    from kdcache.cache.build.data import local_data_files

    local = local_data_files(spec.data)
    files: dict[str, str] = {}
    if local is not None:
        root = Path(spec.data).expanduser().resolve()
        for file in local[1]:
            name = os.path.relpath(file, root) if root.is_dir() else Path(file).name
            files[name] = file_fingerprint(Path(file))
    details = {
        "source": str(Path(spec.data).expanduser().resolve()) if local else spec.data,
        "files": stable_hash(files) if files else None,
        "dataset_fingerprint": None if local else getattr(rows, "_fingerprint", None),
        "split": spec.split,
        "data_config": spec.data_config,
        "field": spec.messages_field or spec.text_field,
        "chat": spec.messages_field is not None,
        "chat_template": (
            stable_hash(tokenizer.chat_template)
            if spec.messages_field and tokenizer.chat_template
            else None
        ),
        "num_rows": len(rows),
        "limit": spec.limit,
        "max_length": spec.max_length,
        "pack": spec.pack,
        "holdout": spec.holdout,
        "preprocessing_version": PREPROCESSING_VERSION,
    }
    hashed = [key for key in details if key != "source" or not local]
    return _with_hash(details, hashed)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable ``section.key: old -> new`` lines for every field whose value differs.

    Sections are compared by their ``hash`` when both have one; then the differing keys inside.
    """
    lines = []
    for section in sorted(set(old) | set(new)):
        before, after = old.get(section), new.get(section)
        if isinstance(before, dict) and isinstance(after, dict):
            if "hash" in before and before.get("hash") == after.get("hash"):
                continue
            keys = sorted(k for k in set(before) | set(after) if k not in ("hash", "name", "path"))
            changed = [k for k in keys if before.get(k) != after.get(k)]
            for key in changed or ["hash"]:
                lines.append(
                    f"{section}.{key}: {_short(before.get(key))} -> {_short(after.get(key))}"
                )
        elif before != after:
            lines.append(f"{section}: {_short(before)} -> {_short(after)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
