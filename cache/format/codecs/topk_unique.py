"""The ``unique`` encoding: ``exact`` top-k, tail samples stored once per distinct id with counts.

The top-k group is byte for byte the ``exact`` one (fp16 log-probs, float32 tail mass); the tail
samples go to the ``tail_counts`` group (``tail_counts.py``): each row's distinct sampled ids
once, with their multiplicity and fp16 log-prob. Lossless: the reader returns the same (M, s)
arrays as ``exact`` (each id repeated by its count), so every estimator is unchanged.
"""

from __future__ import annotations

from kdcache.cache.format.codecs.topk import ENCODINGS, ExactEncoding


class UniqueEncoding(ExactEncoding):
    """``exact`` top-k; tail samples as distinct ids + counts, fp16 log-probs."""

    mode = "unique"
    sample_layout = "counts"
    sample_logprob_bits = 16
    description = (
        "fp16 log-probs, float32 tail mass, tail samples as distinct ids + counts (fp16 log-probs)"
    )


ENCODINGS[UniqueEncoding.mode] = UniqueEncoding()
