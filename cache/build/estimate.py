"""``kdcache build --estimate``: size, run time and top-k mass of a build, measured on a sample.

Nothing is written to the cache directory. The estimate

1. counts the tokens of the whole dataset (both splits) by running the real record stream
   (tokenization and packing only); above ``count_rows`` rows it counts the first rows and scales
   by the row count (then the report says "extrapolated");
2. runs the teacher on the first ``sample_sequences`` training sequences, timing the teacher pass
   after one warm-up batch (tokens/s on this hardware, with these settings);
3. encodes that sample with the real ``ShardWriter`` into a temporary directory: bytes/token, plus
   the fixed cost of one shard file (measured on a one-record shard), so that
   ``projected bytes = bytes/token x tokens + per-shard cost x shards``;
4. reports the teacher mass kept by k' = 1, 2, 4, ... k entries (percentiles over the sample's
   positions) so a user can choose k before spending GPU days.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from kdcache.cache.build.config import ESTIMATE_SAMPLE_SEQUENCES
from kdcache.cache.build.data import SPLITS, RecordStream
from kdcache.cache.build.pipeline import BuildConfig
from kdcache.cache.errors import ConfigError
from kdcache.cache.format.codecs import describe_encoding
from kdcache.cache.format.distortion import round_trip, storage_distortion
from kdcache.cache.format.modes import describe_storage
from kdcache.cache.read.inspect import kprime_values as k_primes
from kdcache.cache.records import SequenceRecord

PERCENTILES = (5, 25, 50, 75, 95)


@dataclass
class EstimateReport:
    """What ``estimate_build`` measured and projected (sizes in bytes, times in seconds)."""

    teacher: str
    data: str
    top_k: int
    mode: str
    device: str
    num_rows: int
    counted_rows: int  # rows whose tokens were counted (== num_rows unless extrapolated)
    split_tokens: dict[str, int]  # projected tokens per split
    split_sequences: dict[str, int]  # projected sequences per split
    sample_sequences: int
    sample_tokens: int
    sample_positions: int
    bytes_per_token: float  # measured with the real shard encoder, without the per-shard cost
    shard_overhead_bytes: int  # fixed cost of one shard file
    projected_shards: int
    tokens_per_second: float  # teacher pass on this hardware
    kept_mass: dict[int, dict[str, float]] = field(default_factory=dict)  # k' -> percentiles
    tail_samples: int = 0  # topk+tail / sampled builds: tail ids drawn per position
    # the encoding's distortion on the sample (``kdcache.cache.format.distortion``)
    distortion: dict[str, float] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(self.split_tokens.values())

    @property
    def extrapolated(self) -> bool:
        return self.counted_rows < self.num_rows

    @property
    def projected_bytes(self) -> int:
        variable = self.bytes_per_token * self.total_tokens
        return round(variable + self.shard_overhead_bytes * self.projected_shards)

    @property
    def projected_seconds(self) -> float:
        return self.total_tokens / self.tokens_per_second if self.tokens_per_second else math.inf

    def to_dict(self) -> dict:
        return {
            **{k: v for k, v in self.__dict__.items() if k != "kept_mass"},
            "kept_mass": {str(k): v for k, v in self.kept_mass.items()},
            "total_tokens": self.total_tokens,
            "extrapolated": self.extrapolated,
            "projected_bytes": self.projected_bytes,
            "projected_seconds": self.projected_seconds,
        }

    def text(self) -> str:
        """The report a person reads (several lines)."""
        how = (
            f"extrapolated from the first {self.counted_rows} rows"
            if self.extrapolated
            else "counted exactly"
        )
        splits = ", ".join(
            f"{split} {self.split_sequences[split]} sequences / {self.split_tokens[split]} tokens"
            for split in self.split_tokens
        )
        layout = describe_storage({"top_k": self.top_k, "tail_samples": self.tail_samples})
        lines = [
            f"estimate for teacher {self.teacher} on {self.data} ({layout}, "
            f"{self.mode} mode); nothing was written",
            f"  dataset: {self.num_rows} rows -> {self.total_tokens} tokens ({splits}; {how})",
            f"  projected cache size: {_bytes(self.projected_bytes)} "
            f"({self.bytes_per_token:.1f} B/token measured with the shard encoder on "
            f"{self.sample_tokens} sample tokens, {self.projected_shards} shard(s))",
            f"  projected teacher time: {_duration(self.projected_seconds)} at "
            f"{self.tokens_per_second:.0f} tokens/s measured on {self.device}",
            *self._encoding_lines(),
            f"  teacher mass kept by the top k' entries, over {self.sample_positions} sample "
            "positions:",
            "      k' " + "".join(f"{'p' + str(p):>8}" for p in PERCENTILES) + "    mean",
        ]
        if not self.kept_mass:
            lines[-2:] = ["  (a sampled build keeps no top-k entries: no kept-mass table)"]
        for k, stats in self.kept_mass.items():
            values = "".join(f"{stats['p' + str(p)]:8.4f}" for p in PERCENTILES)
            lines.append(f"  {k:6d} {values}{stats['mean']:8.4f}")
        return "\n".join(lines)

    def _encoding_lines(self) -> list[str]:
        """The encoding and what it costs in fidelity on the sample."""
        lines = [f"  encoding {describe_encoding(self.mode)}"]
        d = self.distortion
        if not d:
            return lines
        if self.top_k:
            lines.append(
                f"  distortion: mean KL(teacher || stored) {d['mean_kl']:.2e} nats per position "
                f"(p99 {d['p99_kl']:.2e}, max {d['max_kl']:.2e}) over the top-k + tail bucket"
            )
        if self.tail_samples:
            lines.append(
                f"  tail samples: {d['mean_distinct_samples']:.1f} distinct ids of "
                f"{self.tail_samples} draws per position on average; stored log-prob error "
                f"<= {d['max_sample_logprob_error']:.3f} nats"
            )
        return lines


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def kept_mass(records: list[SequenceRecord], top_k: int) -> dict[int, dict[str, float]]:
    """Percentiles and mean of the teacher mass kept by the top k' entries, for each k'.

    Empty for a sampled build (top-k 0), which keeps no top-k entries.
    """
    logprobs = np.concatenate([r.topk_logprobs for r in records])  # (N, k), descending
    cumulative = np.cumsum(np.exp(logprobs.astype(np.float64)), axis=1)  # (N, k)
    report = {}
    for k in k_primes(top_k):
        mass = cumulative[:, k - 1]
        stats = {f"p{p}": float(np.percentile(mass, p)) for p in PERCENTILES}
        report[k] = {**stats, "mean": float(mass.mean())}
    return report


def count_tokens(
    stream: RecordStream, count_rows: int, shard_tokens: int | None = None
) -> tuple[dict[str, int], dict[str, int], int, int]:
    """(tokens per split, sequences per split, rows counted, shards); scaled when rows >
    count_rows. Shards never span row groups: ``ceil(tokens / shard_tokens)`` per (split, group)
    with records (the counted groups keep the whole dataset's group size)."""
    import dataclasses

    rows = stream.rows
    counted = min(len(rows), count_rows)
    if counted < len(rows):
        spec = dataclasses.replace(stream.spec, group_rows=stream.group_size)
        stream = RecordStream(spec, stream.tokenizer, rows=rows.select(range(counted)))
    scale = len(rows) / counted
    tokens, sequences, shards = {}, {}, 0
    for split in SPLITS:
        lengths = []
        for group in range(stream.num_groups):
            group_lengths = [len(s.input_ids) for s in stream.group_sequences(split, group)]
            if shard_tokens and group_lengths:
                shards += math.ceil(sum(group_lengths) / shard_tokens)
            lengths += group_lengths
        tokens[split] = round(sum(lengths) * scale)
        sequences[split] = round(len(lengths) * scale)
    return tokens, sequences, counted, round(shards * scale)


def _shard_bytes(config: BuildConfig, vocab_size: int, records: list[SequenceRecord]) -> int:
    """Bytes of one shard holding ``records``, written by the real ``ShardWriter``."""
    from kdcache.cache.format.shards import ShardWriter

    with tempfile.TemporaryDirectory(prefix="kdcache-estimate-") as directory:
        writer = ShardWriter(
            directory,
            "train",
            top_k=config.top_k,
            vocab_size=vocab_size,
            max_shard_tokens=1 << 62,
            mode=config.mode,
            tail_samples=config.tail_samples,
            observed_logprobs=config.observed_logprobs,
        )
        with writer:
            for record in records:
                writer.write(record)
        return sum(info.bytes for info in writer.close())


def estimate_build(
    config: BuildConfig,
    *,
    sample_sequences: int = ESTIMATE_SAMPLE_SEQUENCES,
    count_rows: int = 20000,
) -> EstimateReport:
    """Measure a sample of the build described by ``config`` and project the whole (writes nothing)."""
    from kdcache.cache.build.teacher import (
        TeacherRunner,
        load_model,
        load_tokenizer,
        output_vocab_size,
        plan_batches,
        resolve_device,
        resolve_dtype,
        run_sequences,
    )

    if sample_sequences < 1:
        raise ConfigError(f"--sample-sequences must be >= 1 (got {sample_sequences})")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.teacher)
    stream = RecordStream(config.data_spec(), tokenizer)
    model = load_model(config.teacher, dtype, device)
    vocab_size = output_vocab_size(model)
    if config.top_k > vocab_size:
        raise ConfigError(f"--top-k {config.top_k} exceeds the teacher's vocabulary ({vocab_size})")
    sample = []
    for sequence in stream.sequences("train"):
        sample.append(sequence)
        if len(sample) >= sample_sequences:
            break
    if not sample:
        raise ConfigError(
            f"dataset '{config.data}' gives no training sequences; nothing to estimate"
        )
    from kdcache.cache.build.pipeline import teacher_pass_sizes

    sizes = teacher_pass_sizes(config, model, device, vocab_size)
    runner = TeacherRunner(
        model, top_k=config.top_k, temperature=config.temperature,
        tail_samples=config.tail_samples, chunk_elements=sizes.chunk_rows * vocab_size,
        observed_logprobs=config.observed_logprobs,
    )  # fmt: skip
    first_batch = plan_batches([len(s.input_ids) for s in sample], sizes.batch_tokens)[0]
    runner.run(
        [sample[i].input_ids for i in first_batch],
        [sample[i].positions for i in first_batch],
        [sample[i].sequence_id for i in first_batch],
    )
    _synchronize(device)
    started = time.perf_counter()  # after a warm-up batch (allocator, kernels, lazy init)
    records = list(run_sequences(runner, sample, sizes.batch_tokens))
    _synchronize(device)
    seconds = time.perf_counter() - started
    sample_tokens = sum(r.num_tokens for r in records)

    overhead = _shard_bytes(config, vocab_size, [_one_token(records[0])])
    sample_bytes = _shard_bytes(config, vocab_size, records)
    bytes_per_token = max(sample_bytes - overhead, 0) / sample_tokens
    split_tokens, split_sequences, counted, shards = count_tokens(
        stream, count_rows, config.shard_tokens
    )
    return EstimateReport(
        teacher=config.teacher,
        data=config.data,
        top_k=config.top_k,
        mode=config.mode,
        device=f"{device} ({str(dtype).removeprefix('torch.')})",
        num_rows=len(stream.rows),
        counted_rows=counted,
        split_tokens=split_tokens,
        split_sequences=split_sequences,
        sample_sequences=len(records),
        sample_tokens=sample_tokens,
        sample_positions=sum(r.num_positions for r in records),
        bytes_per_token=bytes_per_token,
        shard_overhead_bytes=overhead,
        projected_shards=shards,
        tokens_per_second=sample_tokens / seconds if seconds > 0 else 0.0,
        kept_mass=kept_mass(records, config.top_k),
        tail_samples=config.tail_samples,
        distortion=storage_distortion(
            records,
            round_trip(records, config.mode, config.top_k, vocab_size, config.tail_samples),
        ),
    )


def _one_token(record: SequenceRecord) -> SequenceRecord:
    """A one-token, one-position record: its shard's size is the fixed cost of a shard file."""
    return SequenceRecord(
        sequence_id=0,
        input_ids=record.input_ids[:1],
        topk_ids=record.topk_ids[:1],
        topk_logprobs=record.topk_logprobs[:1],
        tail_mass=record.tail_mass[:1],
        positions=np.zeros(1, dtype=np.int32),
        tail_ids=None if record.tail_ids is None else record.tail_ids[:1],
        tail_logprobs=None if record.tail_logprobs is None else record.tail_logprobs[:1],
        observed_logprobs=(
            None if record.observed_logprobs is None else record.observed_logprobs[:1]
        ),
    )


def _synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
