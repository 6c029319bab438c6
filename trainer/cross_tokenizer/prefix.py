"""The prefix rule: a byte string's *first student token*, and the teacher -> student prefix map.

A teacher token without an exact student match (typically one of the teacher's longer tokens)
still says what the student emits next: the student tokenizer cuts that token's string into
pieces, and the first piece is the student's next token. ``--vocab-map prefix`` passes the
teacher token's probability to that first piece instead of the bucket (docs/LOSSES.md).

    first(b) = the student id with exactly the bytes b, if there is one, else
               the first id the student tokenizer emits for the text b, if its bytes are a
               non-empty prefix of b, else none (-1).

A string that is not valid UTF-8 on its own (a byte-level token holding part of a character)
cannot be handed to the tokenizer: its first student token is the longest student piece that is
a prefix of b (a byte-level student has all 256 single bytes). The context a token has in the
running text can make the student cut it differently; the rule looks at the token alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache.trainer.config import VOCAB_MAPS
from kdcache.trainer.cross_tokenizer.vocabulary import VocabularyBytes

__all__ = ["VOCAB_MAPS", "FirstStudentToken", "prefix_map"]


class FirstStudentToken:
    """``first(b)`` of the module docstring, memoised: bytes -> student id (-1: none)."""

    def __init__(self, student: VocabularyBytes, student_tokenizer: Any) -> None:
        self.student = student
        self.tokenizer = student_tokenizer
        self._exact: dict[bytes, int] = {}
        for token_id in range(student.size):
            if not student.special[token_id] and student.pieces[token_id]:
                self._exact.setdefault(student.pieces[token_id], token_id)
        self._longest = max((len(piece) for piece in self._exact), default=0)
        self._memo: dict[bytes, int] = {}

    def _checked(self, data: bytes, token_id: int) -> int:
        piece = self.student.pieces[token_id]
        ok = not self.student.special[token_id] and piece and data.startswith(piece)
        return int(token_id) if ok else -1

    def _longest_prefix(self, data: bytes) -> int:
        for size in range(min(len(data), self._longest), 0, -1):
            token_id = self._exact.get(data[:size])
            if token_id is not None:
                return token_id
        return -1

    def many(self, strings: list[bytes]) -> np.ndarray:
        """(len(strings),) int64 ``first(b)`` of each string (one tokenizer batch call)."""
        out = np.full(len(strings), -1, dtype=np.int64)
        todo: list[int] = []
        texts: list[str] = []
        for index, data in enumerate(strings):
            if data in self._memo:
                out[index] = self._memo[data]
            elif not data:
                self._memo[data] = -1
            elif data in self._exact:
                out[index] = self._memo[data] = self._exact[data]
            else:
                try:
                    texts.append(data.decode("utf-8"))
                    todo.append(index)
                except UnicodeDecodeError:
                    out[index] = self._memo[data] = self._longest_prefix(data)
        if texts:
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            for index, ids in zip(todo, encoded, strict=True):
                data = strings[index]
                first = self._checked(data, ids[0]) if ids else -1
                out[index] = self._memo[data] = first
        return out

    def __call__(self, data: bytes) -> int:
        """``first(data)``: the student's first token of ``data`` (-1: none)."""
        cached = self._memo.get(data)
        return cached if cached is not None else int(self.many([data])[0])


def prefix_map(teacher: VocabularyBytes, exact: np.ndarray, first: FirstStudentToken) -> np.ndarray:
    """(V_teacher,) int64: the exact-match map ``exact`` completed by the prefix rule.

    A teacher text token without an exact match maps to ``first`` of its bytes; special tokens
    keep their exact match (or none).
    """
    out = np.asarray(exact, dtype=np.int64).copy()
    todo = [i for i in range(teacher.size) if out[i] < 0 and not teacher.special[i]]
    if todo:
        out[todo] = first.many([teacher.pieces[i] for i in todo])
    return out
