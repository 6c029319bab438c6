"""Cross-tokenizer vocabularies and alignment, checked by hand on tiny explicit tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.cache.errors import ConfigError
from kdcache.trainer.cross_tokenizer.alignment import CrossTokenizer
from kdcache.trainer.cross_tokenizer.vocabulary import (
    _piece_bytes,
    exact_match_map,
    first_differing_id,
    vocabulary_bytes,
)
from tests import xtok_helpers as hand


def test_vocabulary_bytes_and_exact_matches_by_hand():
    teacher = vocabulary_bytes(hand.teacher_tokenizer())
    student = vocabulary_bytes(hand.student_tokenizer())
    assert teacher.pieces == (b"a", b"b", b"c", b" ", b"ab", b"abc", b"<eos>")
    assert teacher.special.tolist() == [False] * 6 + [True]
    assert student.pieces == (b" ", b"c", b"b", b"a", b"bc", b"<eos>")
    assert exact_match_map(teacher, student).tolist() == hand.TEACHER_TO_STUDENT
    assert first_differing_id(teacher, student) == 0  # 'a' vs ' '
    assert first_differing_id(teacher, teacher) is None


def test_a_special_token_matches_only_a_special_token():
    teacher = hand.byte_level_bpe({"a": 0, "<x>": 1}, [], eos="<eos>")  # '<x>' is plain text here
    student = hand.byte_level_bpe({"a": 0}, [], eos="<x>")  # ... and special here
    mapping = exact_match_map(vocabulary_bytes(teacher), vocabulary_bytes(student))
    assert mapping[0] == 0 and mapping[1] == -1


def test_byte_level_pieces_cover_all_256_bytes():
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    decoded = sorted(_piece_bytes(char, "byte_level")[0] for char in alphabet)
    assert decoded == list(range(256))
    assert _piece_bytes("ĠĊ", "byte_level") == b" \n"


def test_sentencepiece_pieces():
    assert _piece_bytes("<0x0A>", "sentencepiece") == b"\n"
    assert _piece_bytes("\u2581for", "sentencepiece") == b" for"
    assert _piece_bytes("é", "sentencepiece") == "é".encode()


def test_alignment_by_hand():
    cross = CrossTokenizer(hand.teacher_tokenizer(), hand.student_tokenizer())
    # teacher: abc | Ġ | abc | <eos> | abc  ->  ends 3 4 7 8 11
    aligned = cross.align(np.array([5, 3, 5, 6, 5]), np.arange(5))
    # student: a bc Ġ a bc <eos> a bc  ->  ends 1 3 4 5 7 8 9 11
    assert aligned.input_ids.tolist() == [3, 4, 0, 3, 4, 5, 3, 4]
    assert aligned.ends.tolist() == [1, 3, 4, 5, 7, 8, 9, 11]
    # student position i is distilled where its end is a teacher end (then from that row)
    assert aligned.positions.tolist() == [1, 2, 4, 5, 7]
    assert aligned.teacher_rows.tolist() == [0, 1, 2, 3, 4]
    assert aligned.token_bytes.tolist() == [1, 2, 1, 1, 2, 1, 1, 2]


def test_alignment_only_at_stored_teacher_positions():
    cross = CrossTokenizer(hand.teacher_tokenizer(), hand.student_tokenizer())
    aligned = cross.align(np.array([5, 3, 5, 6, 5]), np.array([2, 4]))  # chat-like: 2 rows
    assert aligned.positions.tolist() == [4, 7]
    assert aligned.teacher_rows.tolist() == [0, 1]  # rows of the record, not positions


def test_alignment_skips_a_character_cut_at_the_block_edge():
    from tokenizers import pre_tokenizers

    # full byte alphabet, no merges: every byte is one token on both sides (same ids by sorting)
    alphabet = {
        char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))
    }
    teacher = hand.byte_level_bpe(alphabet, [])
    student = hand.byte_level_bpe({"Ġ": 0, "ab": 1} | {c: i + 2 for i, c in enumerate(alphabet)},
                                  [("a", "b")])  # fmt: skip
    pieces = vocabulary_bytes(teacher).pieces
    by_byte = {piece[0]: index for index, piece in enumerate(pieces[:256])}
    # 'é' is C3 A9: the block starts with its second byte, then 'a', 'b', then 'é' cut after C3
    block = np.array([by_byte[0xA9], by_byte[ord("a")], by_byte[ord("b")], by_byte[0xC3]])
    aligned = CrossTokenizer(teacher, student).align(block, np.arange(4))
    assert aligned.input_ids.tolist() == [1]  # only 'ab' is text the student can read
    assert aligned.ends.tolist() == [3]  # offset 1 (the lone A9) + 2 bytes
    assert aligned.positions.tolist() == [0] and aligned.teacher_rows.tolist() == [2]


def test_a_teacher_special_without_counterpart_is_refused():
    teacher = hand.byte_level_bpe(hand.TEACHER_VOCAB, hand.TEACHER_MERGES, eos="<eos>")
    teacher.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    cross = CrossTokenizer(teacher, hand.student_tokenizer())
    special_id = teacher.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ConfigError, match=r"special token id 7 '<\|im_start\|>'.*no counterpart"):
        cross.align(np.array([5, special_id, 5]), np.arange(3))


def test_the_eos_maps_by_role_when_the_contents_differ():
    student = hand.byte_level_bpe(hand.STUDENT_VOCAB, hand.STUDENT_MERGES, eos="</s>")
    cross = CrossTokenizer(hand.teacher_tokenizer(), student)
    assert cross.special_to_student == {6: student.eos_token_id}


def test_a_word_level_tokenizer_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    with pytest.raises(ConfigError, match="needs a byte-level BPE or SentencePiece tokenizer"):
        vocabulary_bytes(tokenizer)
