"""Re-tokenize a teacher sequence for the student and align the two by byte offsets.

The cache keeps the teacher's ``input_ids`` and tokenizer, so the text is recoverable: the bytes
of the teacher tokens, with special tokens (EOS between packed documents, chat markers) kept as
they are. Both sequences are laid on one offset coordinate: a text token covers its UTF-8 bytes,
a special token one unit. Token ``i`` ends at ``ends[i]``.

Alignment rule: student position ``i`` predicts the student token that starts at ``ends[i]``;
teacher position ``j`` predicts the teacher token that starts at ``teacher_ends[j]``. Student
position ``i`` is *distilled* from teacher position ``j`` exactly when ``ends[i] ==
teacher_ends[j]`` (both have read the same bytes and predict what starts at the same byte), the
teacher stored position ``j``, and the student's next token is not empty.

With ``distill_inside`` a student position whose next token starts strictly *inside* teacher
token ``j + 1`` (``teacher_ends[j] < ends[i] < teacher_ends[j + 1]``) is an *inside* position
of the enclosing teacher position ``j``: the student has already emitted the first
``ends[i] - teacher_ends[j]`` bytes of that token (its target is built by
``kdcache.trainer.cross_tokenizer.inside``). Every other student position gets CE only.

A packed block may start or end inside a multi-byte UTF-8 character (a byte-level token can hold
part of one): those edge bytes are left out of the student's text. A segment whose bytes are not
valid UTF-8 inside, or that the student tokenizer does not reproduce byte for byte, is kept as
student tokens with no distilled position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.cache.errors import ConfigError
from kdcache.trainer.cross_tokenizer.inside import TeacherPieces
from kdcache.trainer.cross_tokenizer.prefix import VOCAB_MAPS, FirstStudentToken, prefix_map
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
    Inside positions (empty unless ``distill_inside``): ``inside_positions`` (I,) increasing,
    ``inside_rows`` (I,) the enclosing teacher position's record row, ``inside_emitted`` (I,
    bytes each) what the student has emitted of the enclosing teacher token;
    ``inside_unstored`` how many inside positions have no stored enclosing teacher position.
    """

    input_ids: np.ndarray
    ends: np.ndarray
    positions: np.ndarray
    teacher_rows: np.ndarray
    token_bytes: np.ndarray
    inside_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    inside_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    inside_emitted: tuple[bytes, ...] = ()
    inside_unstored: int = 0
    teacher_ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (T,)
    reproduced: np.ndarray | None = None  # (S,) bool: in a segment reproduced byte for byte


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

    ``exact_to_student`` (V_teacher,) int64 is the exact-match map (-1: no student token has
    the same bytes); ``teacher_to_student`` the map the rows go through: the exact-match map,
    or (``vocab_map="prefix"``) that map completed by the prefix rule; ``student_matched``
    (V_student,) bool marks student ids some teacher id maps to through ``teacher_to_student``
    (the rest is what the ULD term ranks: never an id a row's mass went to). ``distill_inside``: align inside positions too (module docstring).
    """

    def __init__(
        self,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        vocab_map: str = "exact",
        distill_inside: bool = True,
        xtok_loss: str = "exact",
    ) -> None:
        if vocab_map not in VOCAB_MAPS:
            raise ConfigError(
                f"vocab_map must be one of {', '.join(VOCAB_MAPS)}, got {vocab_map!r}"
            )
        self.student_tokenizer = student_tokenizer
        self.vocab_map = vocab_map
        self.distill_inside = bool(distill_inside)
        self.xtok_loss = xtok_loss  # exact | alm | alm+exact: what the batches carry
        self.teacher = vocabulary_bytes(teacher_tokenizer)
        self.student = vocabulary_bytes(student_tokenizer)
        self.exact_to_student = exact_match_map(self.teacher, self.student)
        self.first_student_token = FirstStudentToken(self.student, student_tokenizer)
        self.teacher_to_student = (
            self.exact_to_student
            if vocab_map == "exact"
            else prefix_map(self.teacher, self.exact_to_student, self.first_student_token)
        )
        self.teacher_pieces = TeacherPieces(self.teacher) if self.distill_inside else None
        self.student_matched = np.zeros(self.student.size, dtype=bool)
        self.student_matched[self.teacher_to_student[self.teacher_to_student >= 0]] = True
        self.student_exact = np.zeros(self.student.size, dtype=bool)
        self.student_exact[self.exact_to_student[self.exact_to_student >= 0]] = True
        self.special_to_student = _special_map(
            teacher_tokenizer, student_tokenizer, self.teacher, self.student
        )
        self._teacher_lengths = self.teacher.offset_lengths()
        self._student_lengths = self.student.offset_lengths()

    def summary(self) -> str:
        """One line for the start-up log: how much of the teacher vocabulary matches."""
        matched = int((self.exact_to_student >= 0).sum())
        student_matched = int(self.student_exact.sum())
        if self.vocab_map == "prefix":
            prefixed = int(((self.teacher_to_student >= 0) & (self.exact_to_student < 0)).sum())
            rest = (
                f"{prefixed:,} more pass their mass to their first student token (prefix map; "
                f"ULD ranks the {int((~self.student_matched).sum()):,} student tokens none maps to)"
            )
        else:
            rest = "the rest go to the bucket and ULD (exact map)"
        inside = "on" if self.distill_inside else "off"
        return (
            f"cross-tokenizer: {matched:,} of {self.teacher.size:,} teacher tokens have an exact "
            f"match ({student_matched:,} of the student's {self.student.size:,} tokens); {rest}; "
            f"positions inside a teacher token distilled: {inside}"
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
        stored = np.asarray(teacher_positions, np.int64)
        candidate = _candidates(ends_array, unaligned)
        positions, rows = _matches(ends_array, candidate, teacher_ends, stored)
        inside: dict[str, Any] = {}
        if self.distill_inside:
            candidate[positions] = False
            candidate[-1:] = False  # the last student token has no next token in the block
            inside_positions, inside_rows, emitted, unstored = _inside(
                ends_array, candidate, teacher_ends, stored
            )
            next_tokens = teacher_ids[stored[inside_rows] + 1]  # (I,) the enclosing tokens
            inside = {
                "inside_positions": inside_positions,
                "inside_rows": inside_rows,
                "inside_emitted": tuple(
                    self.teacher.pieces[token][:size]
                    for token, size in zip(next_tokens.tolist(), emitted.tolist(), strict=True)
                ),
                "inside_unstored": unstored,
            }
        reproduced = np.ones(len(ids_array), dtype=bool)
        for first, last in unaligned:
            reproduced[first:last] = False
        return AlignedSequence(
            input_ids=ids_array,
            ends=ends_array,
            positions=positions,
            teacher_rows=rows,
            token_bytes=self.student_token_bytes(ids_array),
            teacher_ends=teacher_ends,
            reproduced=reproduced,
            **inside,
        )


def _candidates(ends: np.ndarray, unaligned: list[tuple[int, int]]) -> np.ndarray:
    """(S,) bool: student positions that may be distilled (a non-empty next token, outside the
    segments the student tokenizer did not reproduce)."""
    candidate = np.ones(len(ends), dtype=bool)
    candidate[:-1] = ends[1:] > ends[:-1]  # the next student token is not empty
    for first, last in unaligned:
        candidate[first:last] = False
    return candidate


def _inside(
    ends: np.ndarray,
    candidate: np.ndarray,
    teacher_ends: np.ndarray,
    teacher_positions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Inside positions: (positions (I,), record rows (I,), emitted byte counts (I,), unstored).

    ``candidate`` (S,) bool: positions not aligned at a boundary that may be distilled. A
    candidate whose end falls strictly inside teacher token ``j`` (``j >= 1``) belongs to
    teacher position ``j - 1``; those whose position is not stored are counted (``unstored``).
    """
    if len(teacher_ends) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    token = np.searchsorted(teacher_ends, ends, side="left")  # (S,) first token ending >= end
    clipped = np.minimum(token, len(teacher_ends) - 1)
    strictly = candidate & (token < len(teacher_ends)) & (teacher_ends[clipped] != ends)
    enclosing = token - 1  # (S,) the teacher position that predicts token `token`
    if len(teacher_positions) == 0:
        return (
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            int(strictly.sum()),
        )
    rows = np.searchsorted(teacher_positions, enclosing)  # (S,)
    safe_rows = np.minimum(rows, len(teacher_positions) - 1)
    has_row = (enclosing >= 0) & (teacher_positions[safe_rows] == enclosing)
    positions = np.flatnonzero(strictly & has_row)
    unstored = int((strictly & ~has_row).sum())
    emitted = ends[positions] - teacher_ends[enclosing[positions]]
    return positions, safe_rows[positions], emitted, unstored


def _matches(
    ends: np.ndarray,
    candidate: np.ndarray,
    teacher_ends: np.ndarray,
    teacher_positions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(distilled student positions (A,), their teacher rows (A,)) by the alignment rule.

    ``ends`` (S,) student end offsets; ``candidate`` (S,) bool (``_candidates``);
    ``teacher_ends`` (T,); ``teacher_positions`` (M,) the stored teacher positions, increasing
    (row r of the record is position teacher_positions[r]).
    """
    stored_ends = teacher_ends[teacher_positions]  # (M,) increasing
    if len(stored_ends) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.minimum(np.searchsorted(stored_ends, ends), len(stored_ends) - 1)  # (S,)
    positions = np.flatnonzero(candidate & (stored_ends[rows] == ends))
    return positions, rows[positions]
