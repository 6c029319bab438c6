"""Cross-tokenizer distillation: a student whose tokenizer differs from the cache's teacher's.

``CrossTokenizer`` re-tokenizes each cached sequence for the student and aligns positions by
byte offsets; ``map_teacher_rows`` carries the teacher's top-k into student ids (exact string
matches, with ``--vocab-map prefix`` the rest to their first student token, what is left to the
bucket); ``inside_rows`` gives positions inside a teacher token the teacher's consistent tokens
(``--distill-inside``); ``cross_tokenizer_kd_loss`` adds the ULD term on the tokens
without a match; ``CrossTokenizerTarget`` is the teacher target the one training objective
uses. See docs/LOSSES.md ("Students with another tokenizer").
"""

from kdcache.trainer.cross_tokenizer.alignment import AlignedSequence, CrossTokenizer
from kdcache.trainer.cross_tokenizer.inside import InsideRows, inside_rows
from kdcache.trainer.cross_tokenizer.loss import (
    CrossTokenizerLoss,
    cross_tokenizer_kd_loss,
    cross_tokenizer_loss_and_grad,
)
from kdcache.trainer.cross_tokenizer.mapping import MappedRows, map_teacher_rows
from kdcache.trainer.cross_tokenizer.prefix import FirstStudentToken, prefix_map
from kdcache.trainer.cross_tokenizer.target import CrossTokenizerTarget
from kdcache.trainer.cross_tokenizer.uld import uld_loss, uld_loss_and_grad
from kdcache.trainer.cross_tokenizer.vocabulary import VocabularyBytes, vocabulary_bytes

__all__ = [
    "AlignedSequence",
    "CrossTokenizer",
    "CrossTokenizerLoss",
    "CrossTokenizerTarget",
    "FirstStudentToken",
    "InsideRows",
    "MappedRows",
    "VocabularyBytes",
    "cross_tokenizer_kd_loss",
    "cross_tokenizer_loss_and_grad",
    "inside_rows",
    "map_teacher_rows",
    "prefix_map",
    "uld_loss",
    "uld_loss_and_grad",
    "vocabulary_bytes",
]
