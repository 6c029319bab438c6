"""``kdcache train``: distill a student from a cache (``kdcache.trainer.train``).

With neither ``--cache`` nor ``--student`` it trains the demo student from the demo cache that
``kdcache build`` writes by default, into ``kdcache-demo/runs/<loss>``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kdcache.cache.errors import ConfigError
from kdcache.cli import _storage
from kdcache.cli._config import config_option
from kdcache.cli._defaults import field_default, resolved
from kdcache.cli._errors import handle_errors
from kdcache.cli._xtok_defaults import cross_tokenizer_defaults
from kdcache.cli._xtok_defaults import help_text as xtok_defaults_help
from kdcache.demo import DEFAULT_CACHE_DIR as DEMO_CACHE_DIR
from kdcache.demo import DEFAULT_RUN_DIR as DEMO_RUN_DIR
from kdcache.demo.run import DemoSettings
from kdcache.trainer.config import TrainConfig


def _train(name: str):
    return field_default(TrainConfig, name)


def _demo(name: str):
    return field_default(DemoSettings, name)


def _demo_defaults(out: Path | None, loss: str) -> tuple[str, str, Path]:
    from kdcache.demo import DEFAULT_CACHE_DIR, DEFAULT_RUN_DIR, demo_student_config_path

    return str(DEFAULT_CACHE_DIR), str(demo_student_config_path()), out or DEFAULT_RUN_DIR / loss


def resolve_defaults(demo: bool, given: dict) -> dict:
    """Flags the user left out: TrainConfig's defaults, or the demo's training settings."""
    names = (
        "steps", "batch_size", "lr", "warmup_steps", "eval_every", "eval_sequences", "ce_weight"
    )  # fmt: skip
    source = DemoSettings if demo else TrainConfig
    defaults = {name: field_default(source, name) for name in names}
    return {name: defaults[name] if given.get(name) is None else given[name] for name in names}


@handle_errors
def train(
    cache: str | None = typer.Option(
        None,
        help="Cache directory or URL (s3://bucket/prefix ...) written by `kdcache build` (default: with --student also left out, "
        f"the demo cache {DEMO_CACHE_DIR}).",
    ),
    student: str | None = typer.Option(
        None,
        help="Student: save_pretrained dir, hub id, or config .json / dir (random init) "
        "(default: with --cache also left out, the demo student config).",
    ),
    out: Path | None = typer.Option(
        None,
        help=resolved(
            "Run directory (checkpoints, metrics.jsonl)", "required", demo=f"{DEMO_RUN_DIR}/LOSS"
        ),
    ),
    loss: str | None = typer.Option(
        None,
        help=f"fkl, rkl, akl (js, tvd, skew-fkl, skew-rkl) or ce (default: {_train('loss')}; "
        "with --cross-tokenizer: see --xtok-loss).",
    ),
    mu: float = typer.Option(_train("mu"), help="AKL head mass, in (0, 1)."),
    ce_weight: float | None = typer.Option(
        None,
        help=resolved(
            "Share of next-token CE in the loss, in [0, 1]; --loss ce is CE only",
            _train("ce_weight"),
            demo=_demo("ce_weight"),
        ),
    ),
    temperature: float | None = typer.Option(
        None, help="Must equal the cache's temperature (default: the cache's)."
    ),
    steps: int | None = typer.Option(
        None,
        help=resolved(
            "Optimizer steps (exclusive with --epochs)", "one epoch", demo=_demo("steps")
        ),
    ),
    epochs: int | None = typer.Option(
        None, help="Passes over the train split (default: 1 when --steps is not given)."
    ),
    batch_size: int | None = typer.Option(
        None,
        help=resolved(
            "Sequences per micro-batch per rank", _train("batch_size"), demo=_demo("batch_size")
        ),
    ),
    max_tokens: int | None = typer.Option(
        None, help="Padded-token budget per micro-batch (default: none, --batch-size only)."
    ),
    grad_accum: int = typer.Option(_train("grad_accum"), help="Micro-batches per optimizer step."),
    lr: float | None = typer.Option(
        None,
        help=resolved(
            "Peak AdamW learning rate (~1e-3 for small random-init students)",
            _train("lr"),
            demo=_demo("lr"),
        ),
    ),
    weight_decay: float = typer.Option(_train("weight_decay"), help="AdamW weight decay."),
    warmup_steps: int | None = typer.Option(
        None,
        help=resolved(
            "Linear warmup steps before the --lr-scheduler decay",
            _train("warmup_steps"),
            demo=_demo("warmup_steps"),
        ),
    ),
    max_grad_norm: float = typer.Option(
        _train("max_grad_norm"), help="Gradient clipping norm (0 = off)."
    ),
    warmup_ratio: float = typer.Option(
        _train("warmup_ratio"), help="Warmup as a share of the total steps (instead of steps)."
    ),
    lr_scheduler: str = typer.Option(
        _train("lr_scheduler"),
        help="cosine, linear, constant or wsd (warmup-stable-decay), after the warmup.",
    ),
    min_lr: float = typer.Option(
        _train("min_lr"), help="The learning rate the decay ends at (cosine, linear, wsd)."
    ),
    decay_ratio: float = typer.Option(
        _train("decay_ratio"), help="wsd: share of the steps in the final decay."
    ),
    gradient_checkpointing: bool = typer.Option(
        _train("gradient_checkpointing"),
        help="Recompute each decoder layer's activations in backward (less memory, ~1/3 more "
        "compute).",
    ),
    compile: bool = typer.Option(
        _train("compile"), help="torch.compile each decoder layer (refused where it cannot run)."
    ),
    attn_implementation: str = typer.Option(
        _train("attn_implementation"),
        help="Attention kernel: sdpa, eager, flash_attention_2 (needs the flash-attn package).",
    ),
    seed: int = typer.Option(_train("seed"), help="Seed of the student init, data order and RNGs."),
    workers: int | None = typer.Option(
        None,
        help="DataLoader workers decoding shards per rank (default: 1 on CUDA, decoding off the "
        "training process; 0 on CPU; a resume may use another number).",
    ),
    data_partitions: int | None = typer.Option(
        None,
        help="Parts the data order is cut into; a resume can run on up to this many ranks "
        "(default: world size x max(1, --workers) at the run's start; a resume: the run's).",
    ),
    chunk_size: int = typer.Option(
        _train("chunk_size"), help="Positions per lm_head + loss chunk."
    ),
    shuffle_window: int = typer.Option(
        _train("shuffle_window"),
        help="Shards whose sequences are shuffled together each epoch (after the shard order is "
        "shuffled); memory: this many decoded shards per data partition (docs/TRAINING.md).",
    ),
    save_every: int = typer.Option(
        _train("save_every"),
        help="Resumable step-N checkpoint every N steps (0 = by --save-every-minutes only).",
    ),
    save_every_minutes: float = typer.Option(
        _train("save_every_minutes"),
        help="Also a step-N checkpoint every N minutes of wall time, checked every --log-every "
        "steps (0 = off).",
    ),
    save_total_limit: int = typer.Option(
        _train("save_total_limit"),
        help="Keep the N newest step-N checkpoints, delete older ones (0 = keep all).",
    ),
    export_dtype: str = typer.Option(
        _train("export_dtype"),
        help="dtype of the weights in final/ (model only, no optimizer): float32 or bf16.",
    ),
    fsdp: bool = typer.Option(
        _train("fsdp"),
        "--fsdp/--no-fsdp",
        help="Shard the student over the ranks with FSDP2 (one unit per decoder layer; bf16 "
        "params, fp32 reduction on CUDA) for students that do not fit DDP; sharded step-N "
        "checkpoints, a consolidated final/.",
    ),
    dist_timeout: float = typer.Option(
        _train("dist_timeout"),
        help="Minutes a collective may wait before the run fails (torchrun; e.g. on a save).",
    ),
    eval_every: int | None = typer.Option(
        None,
        help=resolved(
            "Held-out KL/CE every N steps (0 = off)",
            _train("eval_every"),
            demo=_demo("eval_every"),
        ),
    ),
    log_every: int = typer.Option(_train("log_every"), help="Metrics line every N steps."),
    resume: bool = typer.Option(
        _train("resume"), help="Continue the run in --out from its last checkpoint."
    ),
    overwrite: bool = typer.Option(_train("overwrite"), help="Replace a different run in --out."),
    device: str = typer.Option(_train("device"), help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option(
        _train("dtype"), help="auto (bf16 autocast on CUDA), float32, bfloat16."
    ),
    teacher: str | None = typer.Option(
        None,
        help="Online: run this teacher in the loop (full-vocabulary KD, no top-k) "
        "(default: none, the cache is the teacher).",
    ),
    cross_tokenizer: bool = typer.Option(
        _train("cross_tokenizer"),
        help="Allow a student whose tokenizer differs from the cache's teacher's: positions "
        "aligned by bytes; the objective is --xtok-loss (docs/LOSSES.md). With "
        "--loss ce: train on the cache's text with the student's own tokenizer (no teacher).",
    ),
    uld_weight: float | None = typer.Option(
        None,
        help="Weight of the ULD term on unmatched tokens (--cross-tokenizer; default: see "
        "--xtok-loss).",
    ),
    vocab_map: str | None = typer.Option(
        None,
        help="--cross-tokenizer: where a teacher token without an exact student match sends its "
        "probability: exact (the bucket and ULD) or prefix (its first student token) (default: "
        "see --xtok-loss).",
    ),
    distill_inside: bool = typer.Option(
        _train("distill_inside"),
        "--distill-inside/--no-distill-inside",
        help="--cross-tokenizer: also distill student positions inside a teacher token "
        "(the teacher's tokens consistent with the bytes emitted so far).",
    ),
    xtok_loss: str | None = typer.Option(
        None,
        help="--cross-tokenizer objective: exact (the teacher's top-k at aligned positions, by "
        "exact string match, + ULD), alm (likelihoods of chunks both tokenizations cut alike, "
        "from the cache's observed log-probs) or alm+exact (both) (docs/LOSSES.md). "
        + xtok_defaults_help(),
    ),
    alm_binarization: float = typer.Option(
        _train("alm_binarization"),
        help="--xtok-loss alm*: the binarisation temperature tau of the chunk likelihoods.",
    ),
    progress: bool = typer.Option(
        _train("progress"), "--progress/--no-progress", help="Show a progress bar."
    ),
    report_to: str = typer.Option(
        _train("report_to"),
        help="Also log the metrics to these trackers, comma-separated: tensorboard, wandb, "
        "mlflow, trackio; all (the installed ones) or none (metrics.jsonl only). Each is an "
        "extra: pip install 'kdcache[wandb]'.",
    ),
    run_name: str | None = typer.Option(
        None, help="The run's name in the trackers (default: the --out folder's name)."
    ),
    storage_option: list[str] = _storage.storage_option(),
    cache_dir: str | None = _storage.cache_dir_option(),
    cache_limit: str = _storage.cache_limit_option(),
    config_file: str | None = config_option(
        aliases={"num_workers": "workers"}, settings=(TrainConfig, DemoSettings)
    ),
) -> None:
    """Train a student on a teacher cache with a sparse KD loss (or on the tokens alone: ce)."""
    from kdcache.trainer import TrainConfig
    from kdcache.trainer import train as run_training

    demo = cache is None and student is None
    if demo:
        cache, student, out = _demo_defaults(out, loss or _train("loss"))
        typer.echo(f"Using the demo defaults: cache {cache}, student {student}, out {out}")
    elif cache is None or student is None:
        raise ConfigError("pass both --cache and --student (or neither, for the demo defaults)")
    elif out is None:
        raise ConfigError("pass --out DIR: the run directory to write")
    if warmup_ratio > 0 and warmup_steps is None:
        warmup_steps = 0  # the ratio replaces the (demo's) default warmup steps
    given = {"batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps}
    xtok = {"loss": loss, "xtok_loss": xtok_loss, "uld_weight": uld_weight,
            "vocab_map": vocab_map, "ce_weight": ce_weight}  # fmt: skip
    if cross_tokenizer and loss != "ce":
        reader = _storage.reader_settings(storage_option, cache_dir, cache_limit)
        xtok = cross_tokenizer_defaults(str(cache), xtok, reader)
    # what is still left out: TrainConfig's defaults (the demo's for ce_weight)
    for name in ("loss", "xtok_loss", "uld_weight", "vocab_map"):
        if xtok[name] is None:
            xtok[name] = _train(name)
    loss, xtok_loss, uld_weight, vocab_map = (
        xtok[n] for n in ("loss", "xtok_loss", "uld_weight", "vocab_map")
    )
    ce_weight = xtok["ce_weight"]
    if loss == "ce" and ce_weight is None:
        ce_weight = 0.0  # the demo's CE mix is for KD losses; a CE-only run is CE-only
    given.update(eval_every=eval_every, steps=steps, ce_weight=ce_weight)
    settings = resolve_defaults(demo, given)
    config = TrainConfig(
        cache=str(cache),
        student=student,
        out=str(out),
        loss=loss,
        mu=mu,
        ce_weight=settings["ce_weight"],
        temperature=temperature,
        steps=settings["steps"] if epochs is None else steps,  # --epochs: no default steps
        epochs=epochs,
        batch_size=settings["batch_size"],
        max_tokens=max_tokens,
        grad_accum=grad_accum,
        lr=settings["lr"],
        weight_decay=weight_decay,
        warmup_steps=settings["warmup_steps"],
        max_grad_norm=max_grad_norm,
        warmup_ratio=warmup_ratio,
        lr_scheduler=lr_scheduler,
        min_lr=min_lr,
        decay_ratio=decay_ratio,
        gradient_checkpointing=gradient_checkpointing,
        compile=compile,
        attn_implementation=attn_implementation,
        seed=seed,
        num_workers=workers,
        data_partitions=data_partitions,
        chunk_size=chunk_size,
        shuffle_window=shuffle_window,
        save_every=save_every,
        save_every_minutes=save_every_minutes,
        save_total_limit=save_total_limit,
        export_dtype=export_dtype,
        dist_timeout=dist_timeout,
        fsdp=fsdp,
        eval_every=settings["eval_every"],
        eval_sequences=settings["eval_sequences"],
        log_every=log_every,
        resume=resume,
        overwrite=overwrite,
        device=device,
        dtype=dtype,
        teacher=teacher,
        cross_tokenizer=cross_tokenizer,
        uld_weight=uld_weight,
        vocab_map=vocab_map,
        distill_inside=distill_inside,
        xtok_loss=xtok_loss,
        alm_binarization=alm_binarization,
        progress=progress,
        report_to=report_to,
        run_name=run_name,
        **_storage.reader_settings(storage_option, cache_dir, cache_limit),
    )
    result = run_training(config)
    if result.rank != 0:
        return  # under torchrun only rank 0 reports
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    loss_text = "n/a" if result.loss is None else f"{result.loss:.4f}"
    typer.echo(
        f"trained {result.steps} steps ({result.tokens:,} tokens) in {result.seconds:.1f}s"
        f"{resumed}; last loss {loss_text}"
    )
    if result.eval:
        from kdcache.trainer.evaluation import format_metric, heldout_keys

        shown = heldout_keys(result.eval)
        typer.echo(
            "held-out: " + ", ".join(f"{key} {format_metric(result.eval[key])}" for key in shown)
        )
    if result.alignment:
        typer.echo(
            f"cross-tokenizer: {result.alignment['aligned_fraction']:.1%} of student positions "
            f"aligned (the rest CE only); {result.alignment['matched_mass']:.1%} of the teacher's "
            "mass on exact-match tokens there; "
            f"{result.alignment['inside_fraction']:.1%} distilled inside a teacher token, "
            f"{result.alignment['inside_ce_only_fraction']:.1%} inside left CE only"
        )
    typer.echo(f"final checkpoint: {result.final}")
