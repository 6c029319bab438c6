"""What each token id of a tokenizer means in bytes, and the map between two vocabularies.

Cross-tokenizer distillation compares a teacher and a student that cut the same text into
different tokens. Both sides are reduced to one common currency: the UTF-8 bytes of each token.

* Byte-level BPE (GPT-2, Llama 3, Qwen, the demo): every vocabulary string is a sequence of
  the 256 printable stand-ins of ``bytes_to_unicode``; the inverse table gives the exact bytes.
* SentencePiece with byte fallback (Llama 2, Mistral, Gemma): ``<0xNN>`` is the byte NN and
  ``▁`` is a space; other pieces are their UTF-8 text.
* Special tokens (EOS, chat markers) are not text: they match only a special token of the other
  side with the same content, and occupy one unit of the shared offset coordinate (see
  ``kdcache.trainer.cross_tokenizer.alignment``).

Other tokenizers (WordPiece, word-level: whitespace is not recoverable from their ids) are
refused with a ``ConfigError``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from kdcache.cache.errors import ConfigError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SENTENCEPIECE_SPACE = "\u2581"  # ▁


@cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable stand-in -> byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    stand_ins, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            stand_ins.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, stand_ins, strict=True)}


def _pipeline_types(tokenizer: Any) -> set[str]:
    """The ``type`` of the backend's decoder and pre-tokenizer (and of their Sequence parts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    state = json.loads(backend.to_str())
    types = set()
    for key, parts_key in (("decoder", "decoders"), ("pre_tokenizer", "pretokenizers")):
        stage = state.get(key) or {}
        parts = stage.get(parts_key, [stage]) if stage.get("type") == "Sequence" else [stage]
        types |= {str(part.get("type")) for part in parts if part}
    return types


def _scheme(tokenizer: Any) -> str:
    """``byte_level`` or ``sentencepiece``; anything else is refused."""
    types = _pipeline_types(tokenizer)
    if "ByteLevel" in types:
        return "byte_level"
    if types & {"ByteFallback", "Metaspace", "Replace"} or type(tokenizer).__name__.startswith(
        ("LlamaTokenizer", "GemmaTokenizer", "T5Tokenizer")
    ):
        return "sentencepiece"
    raise ConfigError(
        f"cross-tokenizer distillation needs a byte-level BPE or SentencePiece tokenizer; "
        f"{type(tokenizer).__name__} ({', '.join(sorted(types)) or 'no decoder'}) cannot give "
        "the bytes of its tokens"
    )


def _piece_bytes(piece: str, scheme: str) -> bytes:
    if scheme == "byte_level":
        table = _unicode_to_byte()
        try:
            return bytes(table[char] for char in piece)
        except KeyError:  # an added non-special token stored as plain text
            return piece.encode("utf-8")
    match = _BYTE_PIECE.match(piece)
    if match is not None:
        return bytes([int(match.group(1), 16)])
    return piece.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8")


@dataclass(frozen=True)
class VocabularyBytes:
    """The meaning of every id of one tokenizer.

    ``pieces[i]`` is the UTF-8 bytes of token ``i`` (the special token's content for special
    ids); ``special[i]`` says it is a special token. ``size`` = ``len(tokenizer)``.
    """

    pieces: tuple[bytes, ...]
    special: np.ndarray  # (size,) bool
    scheme: str  # "byte_level" | "sentencepiece"

    @property
    def size(self) -> int:
        return len(self.pieces)

    def offset_lengths(self) -> np.ndarray:
        """(size,) int64 length of each token on the alignment's offset axis: its bytes, or 1
        for a special token."""
        lengths = np.array([len(piece) for piece in self.pieces], dtype=np.int64)
        return np.where(self.special, 1, lengths)

    def key(self, token_id: int) -> tuple[bool, bytes]:
        """What must be equal for two ids to mean the same thing: (special, bytes)."""
        return bool(self.special[token_id]), self.pieces[token_id]


def vocabulary_bytes(tokenizer: Any) -> VocabularyBytes:
    """The bytes of every token id of a Hugging Face tokenizer (``len(tokenizer)`` ids)."""
    scheme = _scheme(tokenizer)
    size = len(tokenizer)
    added = {int(i): token for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    pieces: list[bytes] = []
    special = np.zeros(size, dtype=bool)
    strings = tokenizer.convert_ids_to_tokens(list(range(size)))
    for token_id, string in enumerate(strings):
        token = added.get(token_id)
        if token is not None and (token.special or token_id in special_ids):
            special[token_id] = True
            pieces.append(str(token).encode("utf-8"))
        elif token is not None:
            pieces.append(str(token).encode("utf-8"))
        else:
            pieces.append(_piece_bytes(string or "", scheme))
    return VocabularyBytes(tuple(pieces), special, scheme)


def exact_match_map(teacher: VocabularyBytes, student: VocabularyBytes) -> np.ndarray:
    """(V_teacher,) int64: the student id with the same bytes (and specialness), else -1.

    When one side has several ids with the same meaning (rare: a special token whose content is
    also a plain token is kept apart by the special flag), the lowest student id wins.
    """
    student_ids: dict[tuple[bool, bytes], int] = {}
    for token_id in range(student.size):
        student_ids.setdefault(student.key(token_id), token_id)
    return np.array(
        [student_ids.get(teacher.key(token_id), -1) for token_id in range(teacher.size)],
        dtype=np.int64,
    )


def first_differing_id(teacher: VocabularyBytes, student: VocabularyBytes) -> int | None:
    """The lowest id that both vocabularies have but with different meanings, else None."""
    for token_id in range(min(teacher.size, student.size)):
        if teacher.key(token_id) != student.key(token_id):
            return token_id
    return None


def describe_id(vocabulary: VocabularyBytes, token_id: int) -> str:
    """``id 7 'ab'`` for messages (specials as their content, bytes shown as text)."""
    text = vocabulary.pieces[token_id].decode("utf-8", errors="backslashreplace")
    return f"id {token_id} {text!r}" + (" (special)" if vocabulary.special[token_id] else "")
