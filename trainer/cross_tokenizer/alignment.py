"""Re-tokenize a teacher sequence for the student and align the two by byte offsets.

The cache keeps the teacher's ``input_ids`` and tokenizer, so the text is recoverable: the bytes
of the teacher tokens, with special tokens (EOS between packed documents, chat markers) kept as
they are. Both sequences are laid on one offset coordinate: a text token covers its UTF-8 bytes,
a special token one unit. Token ``i`` ends at ``ends[i]``.

Alignment rule: student position ``i`` predicts the student token that starts at ``ends[i]``;
teacher position ``j`` predicts the teacher token that starts at ``teacher_ends[j]``. Student
position ``i`` is *distilled* from teacher position ``j`` exactly when ``ends[i] ==
teacher_ends[j]`` (both have read the same bytes and predict what starts at the same byte), the
teacher stored position ``j``, and the student's next token is not empty. Every other student
position gets CE only; ``AlignedSequence`` counts both.

A packed block may start or end inside a multi-byte UTF-8 character (a byte-level token can hold
part of one): those edge bytes are left out of the student's text. A segment whose bytes are not
valid UTF-8 inside, or that the student tokenizer does not reproduce byte for byte, is kept as
student tokens with no distilled position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.cache.errors import ConfigError
from kdcache.trainer.cross_tokenizer.vocabulary import (
    VocabularyBytes,
    describe_id,
    exact_match_map,
    vocabulary_bytes,
)

_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")


@dataclass(frozen=True)
class AlignedSequence:
    """One teacher sequence seen by the student.

    ``input_ids`` (S,) student ids; ``ends`` (S,) end offset of each student token;
    ``positions`` (A,) the distilled student positions, increasing; ``teacher_rows`` (A,) the
    row of the teacher record (index into its top-k arrays) each one is distilled from;
    ``token_bytes`` (S,) bytes of each student token (1 for a special token), for bits per byte.
    """

    input_ids: np.ndarray
    ends: np.ndarray
    positions: np.ndarray
    teacher_rows: np.ndarray
    token_bytes: np.ndarray


def _utf8_edges(data: bytes) -> tuple[int, int]:
    """(start, end) of ``data`` without a cut character at either edge."""
    start = 0
    while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
        start += 1
    end = len(data)
    for back in range(1, min(4, end - start) + 1):
        byte = data[end - back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for its lead byte
        need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        if need > back:
            end -= back
        break
    return start, end


def _special_map(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    teacher: VocabularyBytes,
    student: VocabularyBytes,
) -> dict[int, int]:
    """Teacher special id -> student id: same content, else the same role (eos, bos, pad)."""
    by_content = {student.pieces[i]: i for i in np.flatnonzero(student.special)}
    by_role = {
        str(getattr(teacher_tokenizer, role)): getattr(student_tokenizer, role + "_id")
        for role in _ROLES
        if getattr(teacher_tokenizer, role, None) is not None
        and getattr(student_tokenizer, role + "_id", None) is not None
    }
    mapping: dict[int, int] = {}
    for token_id in np.flatnonzero(teacher.special):
        content = teacher.pieces[token_id]
        if content in by_content:
            mapping[int(token_id)] = int(by_content[content])
        elif (text := content.decode("utf-8", errors="replace")) in by_role:
            mapping[int(token_id)] = int(by_role[text])
    return mapping


class CrossTokenizer:
    """The teacher -> student translation of one run: vocabularies, id map, re-tokenization.

    ``teacher_to_student`` (V_teacher,) int64 is the exact-match map (-1: no student token has
    the same bytes); ``student_matched`` (V_student,) bool marks student ids some teacher id maps
    to (the rest is what the ULD term compares).
    """

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
        self.student_tokenizer = student_tokenizer
        self.teacher = vocabulary_bytes(teacher_tokenizer)
        self.student = vocabulary_bytes(student_tokenizer)
        self.teacher_to_student = exact_match_map(self.teacher, self.student)
        self.student_matched = np.zeros(self.student.size, dtype=bool)
        self.student_matched[self.teacher_to_student[self.teacher_to_student >= 0]] = True
        self.special_to_student = _special_map(
            teacher_tokenizer, student_tokenizer, self.teacher, self.student
        )
        self._teacher_lengths = self.teacher.offset_lengths()
        self._student_lengths = self.student.offset_lengths()

    def summary(self) -> str:
        """One line for the start-up log: how much of the teacher vocabulary matches."""
        matched = int((self.teacher_to_student >= 0).sum())
        return (
            f"cross-tokenizer: {matched:,} of {self.teacher.size:,} teacher tokens have an exact "
            f"match among the student's {self.student.size:,}; the rest go to the bucket and ULD"
        )

    def student_token_bytes(self, input_ids: np.ndarray) -> np.ndarray:
        """(S,) bytes of each student token (1 for a special token)."""
        return self._student_lengths[np.asarray(input_ids, dtype=np.int64)]

    def _special(self, token_id: int) -> int:
        student_id = self.special_to_student.get(token_id)
        if student_id is None:
            raise ConfigError(
                f"the teacher's special token {describe_id(self.teacher, token_id)} has no "
                "counterpart in the student tokenizer (same content or same role); add it to the "
                "student tokenizer"
            )
        return student_id

    def _encode_text(self, data: bytes, offset: int) -> tuple[list[int], list[int], bool]:
        """Student ids, their end offsets and whether they reproduce ``data`` byte for byte."""
        start, end = _utf8_edges(data)
        try:
            text, exact = data[start:end].decode("utf-8"), True
        except UnicodeDecodeError:
            text, exact = data[start:end].decode("utf-8", errors="replace"), False
        ids = self.student_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        lengths = self._student_lengths[np.asarray(ids, dtype=np.int64)].copy()
        total = int(lengths.sum())
        if exact and ids and total == end - start + 1 and self.student.pieces[ids[0]][:1] == b" ":
            lengths[0] -= 1  # a SentencePiece dummy prefix space that the text does not have
            total -= 1
        exact = exact and total == end - start
        return ids, (offset + start + np.cumsum(lengths)).tolist(), exact

    def align(self, teacher_ids: np.ndarray, teacher_positions: np.ndarray) -> AlignedSequence:
        """The student's view of one teacher sequence (``teacher_positions``: the stored rows)."""
        teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
        teacher_ends = np.cumsum(self._teacher_lengths[teacher_ids])  # (T,)
        ids: list[int] = []
        ends: list[int] = []
        unaligned: list[tuple[int, int]] = []  # [first, last) student indices never distilled
        special = self.teacher.special[teacher_ids]
        index, offset = 0, 0
        while index < len(teacher_ids):
            if special[index]:
                ids.append(self._special(int(teacher_ids[index])))
                offset += 1
                ends.append(offset)
                index += 1
                continue
            stop = index
            while stop < len(teacher_ids) and not special[stop]:
                stop += 1
            data = b"".join(self.teacher.pieces[i] for i in teacher_ids[index:stop])
            segment_ids, segment_ends, exact = self._encode_text(data, offset)
            if not exact:
                unaligned.append((len(ids), len(ids) + len(segment_ids)))
            ids.extend(segment_ids)
            ends.extend(segment_ends)
            offset += len(data)
            index = stop
        ids_array, ends_array = np.asarray(ids, np.int64), np.asarray(ends, np.int64)
        positions, rows = _matches(
            ends_array, unaligned, teacher_ends, np.asarray(teacher_positions, np.int64)
        )
        return AlignedSequence(
            input_ids=ids_array,
            ends=ends_array,
            positions=positions,
            teacher_rows=rows,
            token_bytes=self.student_token_bytes(ids_array),
        )


def _matches(
    ends: np.ndarray,
    unaligned: list[tuple[int, int]],
    teacher_ends: np.ndarray,
    teacher_positions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(distilled student positions (A,), their teacher rows (A,)) by the alignment rule.

    ``ends`` (S,) student end offsets; ``teacher_ends`` (T,); ``teacher_positions`` (M,) the
    stored teacher positions, increasing (row r of the record is position teacher_positions[r]).
    """
    candidate = np.ones(len(ends), dtype=bool)
    candidate[:-1] = ends[1:] > ends[:-1]  # the next student token is not empty
    for first, last in unaligned:
        candidate[first:last] = False
    stored_ends = teacher_ends[teacher_positions]  # (M,) increasing
    if len(stored_ends) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.minimum(np.searchsorted(stored_ends, ends), len(stored_ends) - 1)  # (S,)
    positions = np.flatnonzero(candidate & (stored_ends[rows] == ends))
    return positions, rows[positions]
