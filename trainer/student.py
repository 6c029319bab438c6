"""Load a student (pretrained, or randomly initialised from a config) and check its tokenizer.

A student may be a ``save_pretrained`` directory, a hub id, a config ``.json`` file, or a
directory holding only ``config.json`` (random init, seeded). Its tokenizer comes from the
student directory when it has one, else from ``<cache>/tokenizer/`` (saved there by the build).
Before the first step the tokenizer is compared with the cache's: the same ids must mean the same
strings. A student whose ``vocab_size`` is padded beyond its tokenizer is fine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from kdcache.cache.errors import CacheError, ConfigError

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--dtype`` (None = plain float32)."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.endswith(".json")


def _has_weights(directory: Path) -> bool:
    return any(any(directory.glob(pattern)) for pattern in _WEIGHT_PATTERNS)


def _config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"student config {path} is not readable JSON: {error}") from None
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f'student config {path} has no \'model_type\' (e.g. "llama", "gpt2")')
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as error:
        raise ConfigError(f"student config {path}: {error}") from None


def _not_found(spec: str) -> ConfigError:
    return ConfigError(
        f"student {spec!r} not found; pass a save_pretrained directory, a config .json or a hub id"
    )


def load_student_model(spec: str, *, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """The student model in float32, and how it was made ("pretrained" or "random-init").

    Raises ConfigError when ``spec`` is neither a local path nor a loadable hub id.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec).expanduser()
    if path.is_file():
        config = _config_from_json(path)
    elif path.is_dir() and not _has_weights(path):
        if not (path / "config.json").is_file():
            raise ConfigError(f"student directory {path} has no config.json and no weights")
        config = AutoConfig.from_pretrained(path)
    elif path.is_dir() or (not path.exists() and _looks_like_hub_id(spec)):
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        except OSError as error:
            where = "the hub has no such model or it cannot be reached" if not path.exists() else ""
            raise ConfigError(
                f"student {spec!r} could not be loaded ({where or error}); pass a "
                "save_pretrained directory, a config .json or a hub id"
            ) from None
        return model, "pretrained"
    else:
        raise _not_found(spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, "random-init"


def load_student_tokenizer(spec: str, cache_dir: str | Path):
    """The student's own tokenizer when it ships one, else the cache's ``tokenizer/``."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if not path.exists() and not _looks_like_hub_id(spec):
        raise _not_found(spec)
    if path.is_dir() and any((path / name).exists() for name in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(path)
    if not path.exists() and _looks_like_hub_id(spec):
        try:
            return AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError):
            pass  # no tokenizer on the hub side: use the cache's
    cache_tokenizer = Path(cache_dir) / "tokenizer"
    if not cache_tokenizer.is_dir():
        raise CacheError(
            f"the student has no tokenizer and the cache has none at {cache_tokenizer}; "
            "use a student directory that contains its tokenizer"
        )
    return AutoTokenizer.from_pretrained(cache_tokenizer)


def _vocabulary_difference(student: dict[str, int], cache: dict[str, int]) -> str | None:
    """None when every id of the cache's tokenizer means the same string for the student.

    Ids only the student has (added at the end of the same tokenizer) are not differences; a
    cache id the student lacks is one (the teacher can predict that token).
    """
    student_by_id = {index: token for token, index in student.items()}
    cache_by_id = {index: token for token, index in cache.items()}
    differing = sorted(
        index for index, token in cache_by_id.items() if student_by_id.get(index) != token
    )
    if not differing:
        return None
    first = differing[0]
    return (
        f"{len(differing)} of the cache's ids differ (student {len(student)} tokens, cache "
        f"{len(cache)}), the first is id {first}: {student_by_id.get(first)!r} vs "
        f"{cache_by_id[first]!r}"
    )


_CROSS_HINT = "pass --cross-tokenizer to distill across tokenizers, or use the teacher's tokenizer"
# --loss ce reads only the cache's tokens: with another tokenizer it is not distillation at all
CE_OTHER_TOKENIZER_HINT = (
    "--loss ce with another tokenizer trains on the cache's text with the student's own "
    "tokenizer (no teacher targets, not distillation): pass --cross-tokenizer to do that"
)
CE_OTHER_TOKENIZER_NOTE = (
    "--loss ce with another tokenizer: training on the cache's text with the student's own "
    "tokenizer (the teacher's targets are not used: this is not distillation)"
)


def check_tokenizer(
    tokenizer: Any,
    cache_dir: str | Path,
    manifest: dict[str, Any],
    *,
    cross_tokenizer: bool = False,
    hint: str = _CROSS_HINT,
) -> bool:
    """True when the student's ids mean the teacher's strings (a same-tokenizer run).

    Compares the ids both tokenizers have against ``<cache>/tokenizer/`` when the build saved
    it, else the manifest's ``tokenizer_fingerprint``. A difference is refused (naming the first
    differing id) unless ``cross_tokenizer``: then False (a cross-tokenizer run, which needs the
    cache's tokenizer). ``hint`` ends the refusal (how to fix it).
    """
    from transformers import AutoTokenizer

    cache_tokenizer = Path(cache_dir) / "tokenizer"
    if cache_tokenizer.is_dir():
        reference = AutoTokenizer.from_pretrained(cache_tokenizer)
        difference = _vocabulary_difference(tokenizer.get_vocab(), reference.get_vocab())
        if difference is None:
            return True
        if cross_tokenizer:
            return False
        raise ConfigError(
            f"the student's tokenizer does not match the cache's teacher tokenizer: "
            f"{difference}; {hint}"
        )
    expected = manifest.get("tokenizer_fingerprint")
    actual = _fingerprint(tokenizer)
    if expected is not None and actual is not None and actual != expected:
        if cross_tokenizer:
            raise CacheError(
                f"--cross-tokenizer needs the teacher's tokenizer, and the cache has none at "
                f"{cache_tokenizer}; rebuild the cache (the build saves it)"
            )
        raise ConfigError(
            "the student's tokenizer fingerprint differs from the cache's "
            f"({actual[:12]} vs {str(expected)[:12]}); {hint}"
        )
    return True


def _fingerprint(tokenizer: Any) -> str | None:
    """The build's tokenizer fingerprint, when the build module provides one."""
    try:
        from kdcache.cache.build import fingerprint
    except ImportError:
        return None
    function = getattr(fingerprint, "tokenizer_fingerprint", None)
    return None if function is None else str(function(tokenizer))


def check_vocab_size(model: torch.nn.Module, tokenizer: Any) -> None:
    """The student's output layer must cover every token id of the tokenizer."""
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    if vocab_size < len(tokenizer):
        raise ConfigError(
            f"the student's vocab_size {vocab_size} is smaller than its tokenizer "
            f"({len(tokenizer)} tokens); set vocab_size >= {len(tokenizer)} in the student config"
        )


def vocab_coverage_notice(student_rows: int, cache_rows: int) -> str | None:
    """One start-up line when the student's and the cache's vocabulary rows differ, else None.

    ``student_rows``: the student's lm_head rows; ``cache_rows``: the cache's ``vocab_size`` (the
    teacher's). Same tokenizer, padded differently: rows only one side has are handled, not refused.
    """
    if student_rows > cache_rows:
        return (
            f"the student has {student_rows} vocabulary rows, the cache {cache_rows}: the "
            f"{student_rows - cache_rows} rows the teacher never covers (ids {cache_rows}.."
            f"{student_rows - 1}) get teacher probability 0 (no id of the tokenizer maps there)"
        )
    if student_rows < cache_rows:
        return (
            f"the cache has {cache_rows} vocabulary rows, the student {student_rows}: teacher "
            f"entries with ids {student_rows}..{cache_rows - 1} (padding rows the tokenizer never "
            "emits) are folded into the tail bucket"
        )
    return None


def load_teacher(spec: str, cache_dir: str | Path, manifest: dict[str, Any], dtype: torch.dtype):
    """The online teacher, frozen, checked against the cache's tokenizer (same ids)."""
    from transformers import AutoModelForCausalLM

    try:
        check_tokenizer(load_student_tokenizer(spec, cache_dir), cache_dir, manifest)
    except ConfigError as error:
        message = str(error).replace("student's", "--teacher's").replace("student ", "--teacher ")
        raise ConfigError(message.replace("not found", "could not be loaded (not found)")) from None
    try:
        teacher = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ConfigError(
            f"--teacher {spec!r} could not be loaded ({first_line}); pass a save_pretrained "
            "directory or a hub id"
        ) from None
    return teacher.eval().requires_grad_(False)
