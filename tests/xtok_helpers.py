"""Hand-built tokenizers for the cross-tokenizer tests (explicit vocabularies and merges)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# Teacher: a b c Ġ(space) ab abc <eos>; student: Ġ c b a bc <eos> (other ids, other merges).
TEACHER_VOCAB = {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5}
TEACHER_MERGES = [("a", "b"), ("ab", "c")]
STUDENT_VOCAB = {"Ġ": 0, "c": 1, "b": 2, "a": 3, "bc": 4}
STUDENT_MERGES = [("b", "c")]
# Worked out by hand from the two vocabularies: teacher id -> student id with the same bytes.
TEACHER_TO_STUDENT = [3, 2, 1, 0, -1, -1, 5]


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], eos: str = "<eos>"):
    """A ``PreTrainedTokenizerFast`` byte-level BPE with exactly these tokens (+ eos last)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos)


def teacher_tokenizer():
    return byte_level_bpe(TEACHER_VOCAB, TEACHER_MERGES)


def student_tokenizer():
    return byte_level_bpe(STUDENT_VOCAB, STUDENT_MERGES)
