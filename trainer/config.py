"""Settings of ``kdcache train`` and ``kdcache eval``: typed, documented, validated at construction.

Every problem found in ``__post_init__`` is reported in one ``ConfigError`` (one line each), so a
user fixes all flags in one go. Checks that need the cache (the temperature, the tokenizer) run in
``train`` / ``evaluate`` before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from kdcache.cache.errors import ConfigError
from kdcache.cache.storage.location import DEFAULT_CACHE_LIMIT
from kdcache.trainer.trackers import parse_report_to

VOCAB_MAPS = ("exact", "prefix")  # --vocab-map (kdcache.trainer.cross_tokenizer.prefix)

CE_ONLY = "ce"  # next-token cross-entropy alone (no teacher): the baseline student
DEVICES_HINT = "'auto', 'cpu', 'cuda' or 'cuda:N'"
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
LR_SCHEDULERS: tuple[str, ...] = ("cosine", "linear", "constant", "wsd")  # trainer.schedules
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2")  # transformers'

# Settings that may change between an interrupted run and its --resume (they do not change the
# result); every other field must match the stored run.json.
# What a field missing from an older run.json meant: the behaviour before the field existed.
ABSENT_FIELD_MEANS: dict[str, Any] = {"vocab_map": "exact", "distill_inside": False}
# Runs from before --shuffle-window: their data cursors carry their own order (the buffer order),
# so the default resumes them unchanged.
ABSENT_FIELD_MEANS.update(shuffle_window=4, fsdp=False)
ABSENT_FIELD_MEANS.update(lr_scheduler="cosine", min_lr=0.0, warmup_ratio=0.0, decay_ratio=0.1)
ABSENT_FIELD_MEANS.update(xtok_loss="exact", alm_binarization=100.0)
# Fields that change nothing unless the run is --cross-tokenizer.
CROSS_TOKENIZER_FIELDS: frozenset[str] = frozenset(
    {"uld_weight", "vocab_map", "distill_inside", "xtok_loss", "alm_binarization"}
)
# --xtok-loss (kdcache.trainer.cross_tokenizer.likelihood)
XTOK_LOSSES = ("exact", "alm", "alm+exact")
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"resume", "overwrite", "device", "log_every", "save_every", "eval_every", "progress"}
    | {"save_every_minutes", "save_total_limit", "export_dtype", "dist_timeout"}
    | {"storage_options", "cache_dir", "cache_limit"}
    # who reads the data, not what it is: a resume may change the workers and (to keep the
    # global batch at another world size) the accumulation
    | {"num_workers", "grad_accum"}
    | {"report_to", "run_name"}  # where the metrics are also sent (--report-to)
    # how the step runs, not what it computes (up to rounding)
    | {"gradient_checkpointing", "compile", "attn_implementation"}
)
# Fields never written into run.json (storage options may hold credentials)
_NOT_STORED = ("storage_options",)


def reader_options(config: Any) -> dict[str, Any]:
    """``open_cache`` keywords of a Train/EvalConfig: how a URL cache is reached and cached."""
    return {
        "storage_options": config.storage_options,
        "cache_dir": config.cache_dir,
        "cache_limit": config.cache_limit,
    }


def loss_kinds() -> tuple[str, ...]:
    """The accepted ``--loss`` values: the divergences plus ``ce``."""
    from kdcache.trainer.divergences import LOSS_KINDS

    return (*LOSS_KINDS, CE_ONLY)


def _check_device(device: str) -> str | None:
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return None
    return f"unknown device {device!r}; use {DEVICES_HINT}"


def _check_common(problems: list[str], batch_size: int, chunk_size: int, device: str, dtype: str):
    if batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {batch_size}")
    if chunk_size < 1:
        problems.append(f"--chunk-size must be >= 1, got {chunk_size}")
    if (message := _check_device(device)) is not None:
        problems.append(message)
    if dtype not in DTYPES:
        problems.append(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _cross_tokenizer_problems(config: TrainConfig) -> list[str]:
    problems = []
    if not (config.uld_weight >= 0 and math.isfinite(config.uld_weight)):
        problems.append(f"--uld-weight must be a number >= 0, got {config.uld_weight}")
    if config.vocab_map not in VOCAB_MAPS:
        problems.append(
            f"--vocab-map must be one of {', '.join(VOCAB_MAPS)}, got {config.vocab_map!r}"
        )
    if config.xtok_loss not in XTOK_LOSSES:
        problems.append(
            f"--xtok-loss must be one of {', '.join(XTOK_LOSSES)}, got {config.xtok_loss!r}"
        )
    if not (config.alm_binarization > 0 and math.isfinite(config.alm_binarization)):
        problems.append(f"--alm-binarization must be a number > 0, got {config.alm_binarization}")
    if problems:
        return problems
    if not config.cross_tokenizer:
        defaults = TrainConfig.__dataclass_fields__
        flags = {"uld_weight": "--uld-weight", "vocab_map": "--vocab-map",
                 "distill_inside": "--no-distill-inside", "xtok_loss": "--xtok-loss",
                 "alm_binarization": "--alm-binarization"}  # fmt: skip
        changed = [flag for name, flag in flags.items()
                   if getattr(config, name) != defaults[name].default]  # fmt: skip
        return [f"{flag} needs --cross-tokenizer" for flag in changed]
    if config.teacher is not None:
        problems.append("--cross-tokenizer distills from a cache; drop --teacher")
    if config.loss not in (CE_ONLY, "fkl", "rkl", "akl"):
        problems.append(
            f"--cross-tokenizer trains with --loss fkl, rkl, akl or ce, not {config.loss}"
        )
    if config.eval_every:
        problems.append(
            "--eval-every is not available with --cross-tokenizer (the held-out KL is in teacher "
            "tokens); drop it and run `kdcache eval` on the checkpoint"
        )
    return problems


def _long_run_problems(config: TrainConfig) -> list[str]:
    from kdcache.trainer.checkpoint_policy import EXPORT_DTYPES

    problems = []
    if not (config.save_every_minutes >= 0 and math.isfinite(config.save_every_minutes)):
        problems.append(f"--save-every-minutes must be >= 0, got {config.save_every_minutes}")
    if config.save_total_limit < 0:
        problems.append(
            f"--save-total-limit must be >= 0 (0 = keep all), got {config.save_total_limit}"
        )
    if config.export_dtype not in EXPORT_DTYPES:
        problems.append(
            f"--export-dtype must be one of {', '.join(EXPORT_DTYPES)}, got {config.export_dtype!r}"
        )
    if config.fsdp:
        problems += _fsdp_problems(config)
    if not (config.dist_timeout > 0 and math.isfinite(config.dist_timeout)):
        problems.append(
            f"--dist-timeout must be a positive number of minutes, got {config.dist_timeout}"
        )
    return problems


def _speed_and_schedule_problems(config: TrainConfig) -> list[str]:
    """--lr-scheduler / --min-lr / --warmup-ratio / --decay-ratio / --attn-implementation."""
    problems = []
    if config.lr_scheduler not in LR_SCHEDULERS:
        problems.append(
            f"unknown --lr-scheduler {config.lr_scheduler!r}; choose one of "
            f"{', '.join(LR_SCHEDULERS)}"
        )
    if not (0.0 <= config.min_lr <= config.lr):
        problems.append(f"--min-lr must be in [0, --lr {config.lr}], got {config.min_lr}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        problems.append(f"--warmup-ratio must be in [0, 1), got {config.warmup_ratio}")
    if config.warmup_ratio > 0 and config.warmup_steps > 0:
        problems.append("give --warmup-steps or --warmup-ratio, not both")
    if not 0.0 < config.decay_ratio <= 1.0:
        problems.append(f"--decay-ratio must be in (0, 1], got {config.decay_ratio}")
    if config.attn_implementation not in ATTN_IMPLEMENTATIONS:
        problems.append(
            f"unknown --attn-implementation {config.attn_implementation!r}; choose one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    return problems


def _fsdp_problems(config: TrainConfig) -> list[str]:
    from kdcache.trainer.parallel import fsdp_available

    reason = fsdp_available()
    if reason is not None:
        return [f"--fsdp: {reason}; upgrade torch or train with DDP (drop --fsdp)"]
    problems = []
    if config.eval_every:
        problems.append(
            "--fsdp with --eval-every is not supported (the held-out pass runs on rank 0 and "
            "the sharded model needs every rank); drop --eval-every and run `kdcache eval` on "
            "the checkpoints"
        )
    if config.cross_tokenizer:
        problems.append("--fsdp with --cross-tokenizer is not supported yet; drop --fsdp")
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass
class TrainConfig:
    """One student training run from a cache (``kdcache train``)."""

    cache: str  # cache directory or URL (s3://bucket/prefix) written by `kdcache build`
    student: str  # save_pretrained dir, hub id, config .json file or config-only dir (random init)
    out: str  # run directory: run.json, metrics.jsonl, step-N/ and final/ checkpoints
    loss: str = "akl"  # divergence to the teacher (losses.LOSS_KINDS) or "ce" (tokens only)
    mu: float = 0.5  # AKL head mass, in (0, 1)
    ce_weight: float = 0.0  # alpha in (1 - alpha) * KD + alpha * CE, in [0, 1]
    temperature: float | None = None  # None = the cache's; any other value is refused
    steps: int | None = None  # optimizer steps; exclusive with epochs (neither = 1 epoch)
    epochs: int | None = None  # full passes over the train split
    batch_size: int = 8  # sequences per micro-batch per rank
    max_tokens: int | None = None  # optional padded-token budget per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch x world x accum)
    lr: float = 1e-4  # peak AdamW learning rate (pretrained students; ~1e-3 for tiny random ones)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear warmup steps, then the --lr-scheduler decay
    warmup_ratio: float = 0.0  # warmup as a share of the total steps (exclusive with warmup_steps)
    lr_scheduler: str = "cosine"  # cosine | linear | constant | wsd (trainer.schedules)
    min_lr: float = 0.0  # the lr the decay ends at (cosine, linear, wsd), in [0, lr]
    decay_ratio: float = 0.1  # wsd: share of the steps in the final decay
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # student init, data order and every RNG
    num_workers: int | None = None  # DataLoader workers per rank (None = auto: 1 on CUDA, 0 CPU)
    data_partitions: int | None = None  # parts of the data order (None = world x max(1, workers))
    shuffle_buffer: int = 64  # the buffer of cursors from before --shuffle-window (old runs)
    shuffle_window: int = 4  # shards whose sequences are shuffled together (trainer/shuffle.py)
    chunk_size: int = 1024  # positions per chunk of the lm_head + loss (memory: chunk x vocab)
    save_every: int = 0  # resumable checkpoint every N steps (0 = by minutes only)
    save_every_minutes: float = 60.0  # ... and every N minutes of wall time (0 = off)
    save_total_limit: int = 3  # keep the N newest step-N checkpoints (0 = all)
    export_dtype: str = "float32"  # dtype of final/ (float32 or bf16); step-N stay float32
    dist_timeout: float = 30.0  # minutes a collective may wait (e.g. on rank 0 saving)
    fsdp: bool = False  # shard the student with FSDP2 (trainer/parallel.py) instead of DDP
    eval_every: int = 0  # held-out KL/CE every N steps into metrics.jsonl (0 = off)
    eval_sequences: int = 32  # held-out sequences used by eval_every
    log_every: int = 10  # training metrics line every N steps
    resume: bool = False  # continue the run in `out` from its latest checkpoint
    overwrite: bool = False  # delete a different run in `out` and start over
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # auto = bfloat16 autocast on CUDA, float32 on CPU
    gradient_checkpointing: bool = False  # recompute decoder layers in backward (less memory)
    compile: bool = False  # torch.compile each decoder layer
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs flash-attn)
    teacher: str | None = None  # online: run this teacher in the loop, full-vocabulary KD
    cross_tokenizer: bool = False  # allow a student tokenizer other than the teacher's
    uld_weight: float = 1.0  # weight of the ULD term on unmatched tokens (--cross-tokenizer)
    vocab_map: str = "prefix"  # exact | prefix: where unmatched teacher tokens' mass goes
    distill_inside: bool = True  # distill student positions inside a teacher token too
    # the cross-tokenizer objective: exact (exact-match target [+ ULD]), alm (chunk likelihoods,
    # needs the cache's observed log-probs) or alm+exact (both); docs/LOSSES.md
    xtok_loss: str = "alm+exact"
    alm_binarization: float = 100.0  # ALM's binarisation temperature tau (--xtok-loss alm*)
    progress: bool = True  # tqdm progress bar
    report_to: str = "none"  # trackers, comma-separated: tensorboard, wandb, mlflow, trackio, all
    run_name: str | None = None  # the run's name in the trackers (None: the --out folder's name)
    split: str = "train"  # cache split to train on
    eval_split: str = "holdout"  # cache split used by eval_every
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options of a URL
    cache_dir: str | None = None  # URL cache: local read-through dir (None: ~/.cache/kdcache)
    cache_limit: str = DEFAULT_CACHE_LIMIT  # size limit of cache_dir (LRU eviction)

    def __post_init__(self) -> None:
        problems: list[str] = []
        kinds = loss_kinds()
        if self.loss not in kinds:
            problems.append(f"unknown --loss {self.loss!r}; choose one of {', '.join(kinds)}")
        if not 0.0 < self.mu < 1.0:
            problems.append(f"--mu must be in (0, 1) (the AKL head mass), got {self.mu}")
        if not 0.0 <= self.ce_weight <= 1.0:
            problems.append(f"--ce-weight must be in [0, 1], got {self.ce_weight}")
        if self.temperature is not None and not (
            self.temperature > 0 and math.isfinite(self.temperature)
        ):
            problems.append(f"--temperature must be a positive number, got {self.temperature}")
        if self.steps is not None and self.epochs is not None:
            problems.append("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            problems.append(f"--epochs must be >= 1, got {self.epochs}")
        _check_common(problems, self.batch_size, self.chunk_size, self.device, self.dtype)
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.max_tokens is not None and self.steps is None:
            problems.append(
                "--max-tokens needs --steps N: the number of token-budget batches per epoch is "
                "only known after decoding the whole split, which would run before training"
            )
        for name in (
            "grad_accum",
            "log_every",
            "eval_sequences",
            "shuffle_buffer",
            "shuffle_window",
        ):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                problems.append(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.data_partitions is not None and self.data_partitions < 1:
            problems.append(f"--data-partitions must be >= 1, got {self.data_partitions}")
        for name in ("warmup_steps", "save_every", "eval_every", "num_workers"):
            if (getattr(self, name) or 0) < 0:
                flag = "--" + name.replace("_", "-").replace("num-workers", "workers")
                problems.append(f"{flag} must be >= 0, got {getattr(self, name)}")
        problems += _long_run_problems(self)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            problems.append("--weight-decay and --max-grad-norm must be >= 0")
        if self.resume and self.overwrite:
            problems.append("give --resume or --overwrite, not both")
        problems += _speed_and_schedule_problems(self)
        if self.teacher is not None and self.loss == CE_ONLY:
            problems.append("--loss ce trains on the tokens alone; drop --teacher")
        problems += _cross_tokenizer_problems(self)
        try:
            parse_report_to(self.report_to)
        except ConfigError as error:
            problems.append(str(error))
        if self.loss == "ce" and self.ce_weight not in (0.0, 1.0):
            problems.append("--loss ce trains on next-token CE alone; leave --ce-weight out")
        _raise(problems)

    @property
    def alpha(self) -> float:
        """The CE share of the per-position loss (1 for --loss ce)."""
        return 1.0 if self.loss == CE_ONLY else self.ce_weight

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (stored as <out>/run.json; storage options left out)."""
        fields = dataclasses.asdict(self)
        return {name: value for name, value in fields.items() if name not in _NOT_STORED}

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """Fields (other than RESUMABLE_CHANGES) whose value differs from a stored run.json.

        Paths compare by location (``./cache`` and ``cache`` are the same cache).
        """

        def same(name: str, old: Any, new: Any) -> bool:
            if old == new:
                return True
            if name in ("cache", "student", "out", "teacher") and old and new:
                return os.path.abspath(os.path.expanduser(old)) == os.path.abspath(
                    os.path.expanduser(new)
                )
            return False

        def stored_value(name: str) -> Any:
            return stored.get(name, ABSENT_FIELD_MEANS.get(name))

        neither_cross = not self.cross_tokenizer and not stored.get("cross_tokenizer")
        return [
            f"{name}: {stored_value(name)!r} -> {value!r}"
            for name, value in self.to_dict().items()
            if name not in RESUMABLE_CHANGES
            and not (neither_cross and name in CROSS_TOKENIZER_FIELDS)
            and not same(name, stored_value(name), value)
        ]


@dataclass
class EvalConfig:
    """Held-out evaluation of one or several students against a cache (``kdcache eval``)."""

    cache: str  # cache directory or URL
    students: list[str] = field(default_factory=list)  # checkpoints / hub ids, side by side
    split: str = "holdout"  # cache split to evaluate on
    json_path: str | None = None  # write all results here (default: <student>/eval-<split>.json)
    batch_size: int = 8  # sequences per batch
    max_sequences: int | None = None  # evaluate only the first N sequences of the split
    chunk_size: int = 1024  # positions per chunk of the lm_head (memory: chunk x vocab)
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # auto = bfloat16 autocast on CUDA, float32 on CPU
    teacher: str | None = None  # also report KL to this teacher's full distribution
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options of a URL
    cache_dir: str | None = None  # URL cache: local read-through dir (None: ~/.cache/kdcache)
    cache_limit: str = DEFAULT_CACHE_LIMIT  # size limit of cache_dir (LRU eviction)
    cross_tokenizer: bool = False  # allow students whose tokenizer differs (bits per byte)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.students, str):
            self.students = [self.students]
        if not self.students:
            problems.append("give at least one --student to evaluate")
        _check_common(problems, self.batch_size, self.chunk_size, self.device, self.dtype)
        if self.max_sequences is not None and self.max_sequences < 1:
            problems.append(f"--max-sequences must be >= 1, got {self.max_sequences}")
        _raise(problems)
