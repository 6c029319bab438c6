"""``BuildConfig``: the settings of one ``kdcache build``, validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.cache.build.data import DataSpec
from kdcache.cache.build.slices import slice_problems
from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.extraction.sizing import parse_auto_int
from kdcache.cache.format.codecs import MODES
from kdcache.cache.format.codecs.tail_samples import MAX_TAIL_SAMPLES
from kdcache.cache.format.codecs.topk_compact import compact_tail_samples_problem
from kdcache.cache.format.modes import storage_mode
from kdcache.cache.storage.location import Location, resolve_location

__all__ = [
    "DEFAULT_ENCODING",
    "DEFAULT_TAIL_SAMPLES",
    "DEFAULT_TOP_K",
    "DTYPE_NAMES",
    "ESTIMATE_SAMPLE_SEQUENCES",
    "MODES",
    "BuildConfig",
]

# teacher dtypes (cache.teacher maps them to torch dtypes; this module stays torch-free so that
# `kdcache --help` can read the defaults below without importing torch)
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


# the default cache (issue 25, docs/QUALITY.md "Small caches"): top-8 + 8 tail samples in the q8
# encoding, 35-38 B/token at a 16k vocabulary with the observed column. Over 150-step students on
# two teachers, FKL and AKL, 3 seeds each, it kept the same mean share of online FKL's gain as
# top-24 + 16 (82% vs 81%) with a better worst seed (64% vs 36%), at half the bytes; neither kept
# >= 95% on every seed of the flat demo teacher.
DEFAULT_TOP_K = 8
DEFAULT_TAIL_SAMPLES = 8
DEFAULT_ENCODING = "q8"
ESTIMATE_SAMPLE_SEQUENCES = 64  # sequences `kdcache build --estimate` runs the teacher on


@dataclass
class BuildConfig:
    """Settings of one ``kdcache build`` (validated on creation; all problems in one ConfigError)."""

    teacher: str  # local save_pretrained directory or Hugging Face model id
    data: str  # hub dataset id, local jsonl/json/parquet/csv/txt file, or a directory of them
    out: str | Path  # cache directory or fsspec URL (s3://bucket/prefix); a URL stays a str
    split: str = "train"  # dataset split to read
    data_config: str | None = None  # dataset configuration name (hub datasets)
    text_field: str = "text"  # column holding the documents
    messages_field: str | None = None  # column of chat messages (then only assistant tokens)
    top_k: int | None = None  # entries kept per position (None: see DEFAULT_TOP_K)
    temperature: float = 1.0  # softmax temperature of the stored distributions
    max_length: int = 1024  # tokens per sequence
    pack: bool = True  # pack documents into max_length blocks (EOS between) vs one per row
    limit: int | None = None  # use only the first rows
    holdout: float = 0.01  # fraction of rows (by content hash) in the "holdout" split
    dtype: str = "auto"  # teacher dtype: auto = bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto = cuda if available, else cpu
    # padded tokens per teacher batch / positions per head chunk: "auto" (CPU: 16384 and a
    # 2^24-logit chunk, as measured; CUDA: from free memory, cache/extraction/sizing.py) or N
    batch_tokens: int | str = "auto"
    head_chunk_rows: int | str = "auto"
    # shard encoding (--encoding / --mode): q8, exact, unique or compact (docs/FORMAT.md)
    mode: str = DEFAULT_ENCODING
    # topk+tail mode: tail ids drawn per position from p_j / p_tail (0 = off; None: see below)
    tail_samples: int | None = None
    # store the teacher's log-prob of each observed next token (the ``observed`` column, ~2
    # B/token; cross-tokenizer --xtok-loss alm needs it, inspect reports the teacher's perplexity)
    observed_logprobs: bool = True
    overwrite: bool = False  # replace an existing different cache in ``out``
    shard_tokens: int = 1 << 20  # tokens per shard file (--shard-tokens)
    # rows per row group, the unit of work: "auto" (~64 groups of 256-1024 rows, data.py) or N
    group_rows: int | str = "auto"
    # an independent slice (--num-shards N --shard-index I): the row groups g % N == I, no
    # collective; the last slice to finish writes the manifest (cache/build/slices.py)
    num_shards: int | None = None
    shard_index: int | None = None
    progress: bool = True  # show a tqdm bar
    # fsspec options of a URL --out (endpoint, credentials); never written into the manifest
    storage_options: dict[str, Any] = field(default_factory=dict)
    staging_dir: str | None = None  # URL --out: local staging root (default <cache home>/staging)

    def __post_init__(self) -> None:
        # Defaults (docs/QUALITY.md): neither set -> topk+tail, top-8 + 8 tail samples; only
        # top_k set -> a plain top-k cache; only tail_samples set -> top-8 + that many samples.
        if self.tail_samples is None:
            self.tail_samples = DEFAULT_TAIL_SAMPLES if self.top_k is None else 0
        if self.top_k is None:
            self.top_k = DEFAULT_TOP_K
        location = resolve_location(self.out, self.storage_options)
        self.out = location.url if location.is_remote else location.local_path
        problems = []
        if not self.teacher:
            problems.append("--teacher is empty: pass a model directory or hub id")
        if not self.data:
            problems.append("--data is empty: pass a dataset id, file or directory")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"--top-k must be >= 1 (got {self.top_k})")
        elif isinstance(self.tail_samples, int) and not self._stores_a_teacher():
            problems.append(
                "--top-k must be >= 1 (got 0): --top-k 0 stores no teacher entries, only for a "
                "sampled cache with --tail-samples N (N draws from the whole distribution)"
            )
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)):
            problems.append(f"--temperature must be a finite number (got {self.temperature})")
        elif self.temperature <= 0:
            problems.append(f"--temperature must be > 0 (got {self.temperature})")
        if self.max_length < 2:
            problems.append(f"--max-length must be >= 2 (got {self.max_length})")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be >= 1 (got {self.limit})")
        if not 0.0 <= self.holdout < 1.0:
            problems.append(f"--holdout must be in [0, 1) (got {self.holdout})")
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"--dtype must be one of {', '.join(DTYPE_NAMES)} (got {self.dtype})")
        try:
            self.batch_tokens = parse_auto_int(self.batch_tokens, "--batch-tokens")
            self.head_chunk_rows = parse_auto_int(self.head_chunk_rows, "--head-chunk-rows")
        except ConfigError as error:
            problems.append(str(error))
        if not isinstance(self.shard_tokens, int) or self.shard_tokens < 1:
            problems.append(f"--shard-tokens must be >= 1 (got {self.shard_tokens})")
        try:
            self.group_rows = parse_auto_int(self.group_rows, "--group-rows")
        except ConfigError as error:
            problems.append(str(error))
        problems.extend(slice_problems(self.num_shards, self.shard_index))
        if self.mode not in MODES:
            problems.append(f"--mode must be one of {', '.join(MODES)} (got {self.mode})")
        if not isinstance(self.tail_samples, int) or not 0 <= self.tail_samples <= MAX_TAIL_SAMPLES:
            problems.append(
                f"--tail-samples must be in [0, {MAX_TAIL_SAMPLES}] (got {self.tail_samples})"
            )
        elif isinstance(self.top_k, int) and (
            compact := compact_tail_samples_problem(self.mode, self.top_k, self.tail_samples)
        ):
            problems.append(compact)
        if not self.text_field and not self.messages_field:
            problems.append("--text-field is empty: name the column holding the text")
        if isinstance(self.out, Path) and self.out.exists() and not self.out.is_dir():
            problems.append(f"--out {self.out} is a file: pass a directory path")
        if problems:
            raise ConfigError("; ".join(problems))

    def _stores_a_teacher(self) -> bool:
        """Whether top_k and tail_samples name a storage mode (``cache.modes``)."""
        try:
            storage_mode({"top_k": self.top_k, "tail_samples": self.tail_samples})
        except CacheError:
            return False
        return True

    @property
    def location(self) -> Location:
        """Where the cache goes: a local directory or a URL (``Location.is_remote``)."""
        return resolve_location(self.out, self.storage_options)

    def data_spec(self) -> DataSpec:
        return DataSpec(
            data=self.data,
            split=self.split,
            data_config=self.data_config,
            text_field=self.text_field,
            messages_field=self.messages_field,
            max_length=self.max_length,
            pack=self.pack,
            limit=self.limit,
            holdout=self.holdout,
            group_rows=self.group_rows,
        )
