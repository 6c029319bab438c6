"""``train(config)``: distill one student from a cache (or train it on the tokens alone).

Everything that can refuse (config, cache, temperature, student, tokenizer, out dir) is checked
before the first byte is written. The run directory then holds ``run.json`` (the config),
``metrics.jsonl`` (one JSON line per logged step / eval), ``step-N/`` checkpoints and ``final/``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.extraction.heads import resolve_head
from kdcache.trainer import distributed as dist_utils
from kdcache.trainer import parallel
from kdcache.trainer.checkpoint import (
    FINAL,
    check_run_dir,
    load_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    start_run_dir,
    truncate_metrics,
)
from kdcache.trainer.checkpoint_policy import (
    SaveClock,
    cast_weights,
    export_state_dict,
    prune_checkpoints,
    remove_partial_saves,
)
from kdcache.trainer.config import CE_ONLY, TrainConfig, reader_options
from kdcache.trainer.cross_tokenizer.batches import AlignmentStats, CrossTokenizerDataset
from kdcache.trainer.cross_tokenizer.setup import cross_tokenizer_for, cross_tokenizer_target
from kdcache.trainer.data import IGNORE_INDEX, CacheDataset
from kdcache.trainer.device_settings import (
    enable_tf32,
    head_compute_dtype,
    loader_workers,
    pin_memory_for,
)
from kdcache.trainer.model_wrapping import WrapSettings, check_wrap_settings, wrap_model
from kdcache.trainer.objective import DistillObjective, batch_loss, with_position_rows
from kdcache.trainer.optim import build_optimizer, build_scheduler, load_optimizer_state
from kdcache.trainer.resume import partitions_for, rng_for_rank, world_size_note
from kdcache.trainer.sharded_checkpoint import full_weights, is_sharded, load_sharded, save_sharded
from kdcache.trainer.student import (
    CE_OTHER_TOKENIZER_HINT,
    CE_OTHER_TOKENIZER_NOTE,
    autocast_dtype,
    check_tokenizer,
    check_vocab_size,
    load_student_model,
    load_student_tokenizer,
    load_teacher,
    vocab_coverage_notice,
)
from kdcache.trainer.targets import (
    DenseTeacherTarget,
    LossOptions,
    TeacherTarget,
    target_for_cache,
)
from kdcache.trainer.trackers import check_report_to, parse_report_to, start_metrics_log


@dataclass
class TrainResult:
    """What a finished ``train`` call produced."""

    out: Path  # the run directory
    final: Path  # the final save_pretrained checkpoint
    steps: int  # optimizer steps done in total (including before a resume)
    tokens: int  # tokens seen in total (all ranks)
    loss: float | None  # training loss of the last step (None when nothing ran)
    seconds: float  # wall time of this call
    resumed_from: int | None  # step of the checkpoint resumed from
    student_source: str  # "pretrained", "random-init" or "checkpoint"
    eval: dict[str, float] | None = None  # last held-out metrics (eval_every)
    rank: int = 0  # this process's rank (only rank 0 reports)
    alignment: dict[str, float] | None = None  # cross-tokenizer runs: aligned share, matched mass


def _cache_temperature(config: TrainConfig, manifest: dict[str, Any]) -> float:
    cached = float(manifest["temperature"])
    if config.teacher is not None and config.temperature is not None:
        return config.temperature  # online: the full teacher can be tempered at will
    if config.temperature is not None and not math.isclose(config.temperature, cached):
        raise ConfigError(
            f"--temperature {config.temperature} differs from the cache's {cached}: top-k + tail "
            "at one temperature cannot be re-tempered exactly; leave --temperature out"
        )
    return cached


def _micro_batches(dataset: CacheDataset, max_epochs: int | None, grad_accum: int):
    """Lists of up to ``grad_accum`` batches, across epochs (stops after ``max_epochs``)."""
    group: list[dict[str, torch.Tensor]] = []
    while max_epochs is None or dataset.epoch < max_epochs:
        produced = False
        for batch in dataset.epoch_batches():
            produced = True
            group.append(batch)
            if len(group) == grad_accum:
                yield group
                group = []
        if not produced and dataset.num_batches() == 0:
            raise CacheError(
                f"split {dataset.split!r} of the cache holds no sequences for rank {dataset.rank}"
            )
    if group:
        yield group


def _eval_split(config: TrainConfig, cache) -> str | None:
    if not config.eval_every:
        return None
    if config.eval_split not in cache.manifest["splits"] or not cache.shards(config.eval_split):
        raise ConfigError(
            f"--eval-every needs a {config.eval_split!r} split but the cache has "
            f"{', '.join(cache.manifest['splits'])}; build with a holdout or drop --eval-every"
        )
    return config.eval_split


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.student`` on ``config.cache`` and return where the result is.

    Under torchrun (``WORLD_SIZE > 1``) every rank calls this; only rank 0 writes.
    """
    info = dist_utils.init_distributed(config.device, config.dist_timeout, group=config.fsdp)
    try:
        return _Run(config, info).run()
    finally:
        dist_utils.shutdown(info)


class _Run:
    """One training run: set up (all checks first), then the step loop, then the final save."""

    def __init__(self, config: TrainConfig, info: dist_utils.DistInfo) -> None:
        from kdcache.cache import open_cache

        self.config, self.info, self.started = config, info, time.perf_counter()
        self.cache = cache = open_cache(config.cache, **reader_options(config))
        self.temperature = _cache_temperature(config, cache.manifest)
        cache_target = target_for_cache(cache.manifest)  # the storage mode, decided once
        if config.teacher is None and config.loss != CE_ONLY:
            cache_target.check_loss(config.loss)
        cache.shards(config.split)  # CacheError naming the splits when it is missing
        self.resume_from = check_run_dir(config)
        self.resume_state = (
            None if self.resume_from is None else load_training_state(self.resume_from)
        )
        spec = config.student if self.resume_from is None else str(self.resume_from)
        self.model, self.source = load_student_model(
            spec, seed=config.seed, attn_implementation=config.attn_implementation
        )
        if self.resume_from is not None:
            self.source = "checkpoint"
        self.tokenizer = load_student_tokenizer(spec, cache.path)  # cache.path: a local copy
        same_tokenizer = check_tokenizer(
            self.tokenizer, cache.path, cache.manifest, cross_tokenizer=config.cross_tokenizer,
            **({"hint": CE_OTHER_TOKENIZER_HINT} if config.loss == CE_ONLY else {}),
        )  # fmt: skip
        check_vocab_size(self.model, self.tokenizer)
        self.cross = (
            None
            if same_tokenizer
            else cross_tokenizer_for(
                cache,
                self.tokenizer,
                config.vocab_map,
                config.distill_inside,
                xtok_loss=config.xtok_loss if config.loss != "ce" else "exact",
            )
        )
        notice = (
            vocab_coverage_notice(
                int(self.model.get_output_embeddings().weight.shape[0]),
                int(cache.manifest["vocab_size"]),
            )
            if self.cross is None
            else self.cross.summary()
        )
        if self.cross is not None and config.loss == CE_ONLY:
            notice = CE_OTHER_TOKENIZER_NOTE
        if notice is not None and info.is_main:
            print(f"note: {notice}", file=sys.stderr)
        self.device = info.device
        self.wrap_settings = WrapSettings(
            gradient_checkpointing=config.gradient_checkpointing, compile=config.compile
        )
        check_wrap_settings(self.model, self.wrap_settings, self.device)  # before any write
        self.autocast = autocast_dtype(config.dtype, self.device)
        enable_tf32(self.device, self.autocast)  # fp32 runs on CUDA: TF32 matmuls
        self.probe = torch.arange(min(8, len(self.tokenizer)), device=self.device).unsqueeze(0)
        self.target: TeacherTarget = cache_target
        if config.teacher is not None:
            dtype = self.autocast or torch.float32
            teacher = load_teacher(config.teacher, cache.path, cache.manifest, dtype)
            teacher.to(self.device).eval()
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            self.target = DenseTeacherTarget(teacher, resolve_head(teacher, self.probe), vocab)
        make_dataset = CacheDataset
        if self.cross is not None:  # batches in the student's tokens, teacher rows mapped
            make_dataset = functools.partial(CrossTokenizerDataset, cross=self.cross)
            self.target = cross_tokenizer_target(
                self.cross, self.model, config.uld_weight, config.alm_binarization
            )
        self.dataset = make_dataset(
            cache,
            config.split,
            batch_size=config.batch_size,
            max_tokens=config.max_tokens,
            rank=info.rank,
            world_size=info.world_size,
            num_workers=(workers := loader_workers(config.num_workers, self.device)),
            pin_memory=pin_memory_for(self.device, workers),
            seed=config.seed,
            shuffle_buffer=config.shuffle_buffer,
            shuffle_window=config.shuffle_window,
            pad_id=0,
            target=self.target,
            partitions=partitions_for(config.data_partitions, self.resume_state),
        )
        self.batch_loss = batch_loss
        self.alignment = AlignmentStats()
        self.eval_split = _eval_split(config, cache)
        self.total_steps = self._total_steps()

        report_to = parse_report_to(config.report_to)
        check_report_to(report_to)  # a missing tracker package: refused before anything is written

        self.out = Path(config.out)  # all checks passed: now (rank 0) writes
        dist_utils.barrier(info)  # every rank checked the out dir before rank 0 writes into it
        if info.is_main:
            start_run_dir(self.out, config)
            run_name = config.run_name or self.out.resolve().name
            self.metrics = start_metrics_log(
                self.out, report_to, run_name, config.to_dict(), fresh=not config.resume
            )
            for name in remove_partial_saves(self.out):  # a save killed midway
                print(f"note: removed {name}, left by a save that did not finish", file=sys.stderr)
        dist_utils.barrier(info)
        self.save_clock = SaveClock(config.save_every, config.save_every_minutes, config.log_every)

        self.objective = self._objective()
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.step, self.tokens, self.loss = 0, 0, None
        self.pending_loss: torch.Tensor | None = None  # the last step's loss, still on the device
        self.grad_norm: torch.Tensor | float = float("nan")
        self.last_eval: dict[str, float] | None = None
        torch.manual_seed(config.seed)
        if self.resume_state is not None:
            self._load_state(self.resume_state)
            self.resume_state = None  # loaded: no copy of the optimizer state held for the run
        if config.resume and info.is_main:  # lines logged after the checkpoint are redone
            truncate_metrics(self.out, self.step)

    def _total_steps(self) -> int:
        config = self.config
        if config.steps is not None:
            return config.steps
        if self.resume_state is not None and "total_steps" in self.resume_state:
            return int(self.resume_state["total_steps"])  # what the schedule was built for
        ranks = range(self.info.world_size)
        per_epoch = min(self.dataset.num_batches(rank) for rank in ranks)
        total = math.ceil((config.epochs or 1) * per_epoch / config.grad_accum)
        if total < 1:
            raise CacheError(f"split {config.split!r} of the cache holds no sequences to train on")
        return total

    def _objective(self) -> nn.Module:
        model, device = self.model, self.device
        model.to(device).eval()  # resolve_head compares against the forward: no dropout
        chunked = resolve_head(model, self.probe) is not None
        model.train()
        self.model = model = wrap_model(model, self.wrap_settings, device)
        objective = self._distill_objective(chunked)
        return parallel.wrap_objective(
            objective, self.info, fsdp=self.config.fsdp, autocast=self.autocast
        )

    def _distill_objective(self, chunked: bool) -> nn.Module:
        model, config = self.model, self.config
        ce_only = config.loss == CE_ONLY
        kind = "fkl" if ce_only else config.loss  # CE only: the options are never used
        objective = DistillObjective(
            model,
            None if ce_only else self.target,
            LossOptions(kind=kind, mu=config.mu, temperature=self.temperature),
            alpha=config.alpha,
            chunk_size=config.chunk_size,
            chunked=chunked,
            compute_dtype=head_compute_dtype(self.autocast),
        )
        if self.info.is_main:
            for note in self._fallback_notes(chunked, None if ce_only else kind):
                print(f"note: {note}", file=sys.stderr, flush=True)
        return objective

    def _fallback_notes(self, chunked: bool, kind: str | None) -> list[str]:
        """One line per reason the run leaves the fused closed-form path (none: it is on it)."""
        notes = []
        if not chunked:
            notes.append(
                "the student's lm_head does not split off exactly (logit post-processing): the "
                "loss runs on the model's full logits, memory O(batch tokens x vocab)"
            )
        if kind is not None and self.config.alpha < 1.0:
            reason = self.target.fallback_reason(kind)
            if reason is not None:
                notes.append(reason)
        return notes

    def _load_state(self, state: dict[str, Any]) -> None:
        config, info = self.config, self.info
        self.dataset.load_state_dicts(state["data"])  # any world size: regrouped partitions
        note = world_size_note(state, info.world_size, config.batch_size, config.grad_accum)
        if note is not None and info.is_main:
            print(f"note: {note}", file=sys.stderr, flush=True)
        if "optimizer" in state:  # final/ is model-only: a finished run has nothing to resume
            load_optimizer_state(self.optimizer, state.pop("optimizer"), self.device)
        elif is_sharded(self.resume_from):  # --fsdp: model + optimizer, re-sharded to these ranks
            load_sharded(self.resume_from, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(rng_for_rank(state, info.rank))
        self.step, self.tokens, self.loss = int(state["step"]), int(state["tokens"]), state["loss"]
        self.resumed_step = self.step

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        config, info = self.config, self.info
        progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            desc=f"train {config.loss}",
            disable=not (config.progress and info.is_main),
            dynamic_ncols=True,
        )
        max_epochs = (config.epochs or 1) if config.steps is None else None
        batches = _micro_batches(self.dataset, max_epochs, config.grad_accum)
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < self.total_steps:
            group = next(batches, [])
            if dist_utils.all_reduce(float(len(group)), info, op="min") < 1:
                break  # some rank ran out of data (epochs mode): stop together
            window_tokens += self._optimizer_step(group)
            progress.update(1)
            last = self.step == self.total_steps
            if self.step % config.log_every == 0 or last:  # the only host sync of the metrics
                grad_norm = self._reduce_metrics()
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed if elapsed > 0 else 0.0
                progress.set_postfix(loss=f"{self.loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                if info.is_main:
                    self._log_train(grad_norm, tokens_per_s)
            if self.eval_split and info.is_main and (self.step % config.eval_every == 0 or last):
                self._evaluate()
            if not last and self.save_clock.due(self.step, info):
                self._save(f"step-{self.step}")
                self.save_clock.saved()
        batches.close()  # stops DataLoader workers of an unfinished epoch now, not at GC
        progress.close()
        final = self._save(FINAL, resumable=False)
        if info.is_main:
            self.metrics.finish()
        return TrainResult(
            out=self.out,
            final=final,
            steps=self.step,
            tokens=self.tokens,
            loss=self.loss,
            seconds=time.perf_counter() - self.started,
            resumed_from=getattr(self, "resumed_step", None),
            student_source=self.source,
            eval=self.last_eval,
            rank=info.rank,
            alignment=self.alignment.as_dict() if self.cross is not None else None,
        )

    def _optimizer_step(self, group: list[dict[str, torch.Tensor]]) -> int:
        """Forward/backward every micro-batch of ``group``, then one optimizer step.

        Returns the tokens of the step over all ranks. The loss and gradient norm stay on the
        device (``pending_loss``, ``grad_norm``) until ``_reduce_metrics``: no host sync here
        but the step's position counts, which are summed from the host-side batches.
        """
        info, config = self.info, self.config
        # Position counts of the whole step (all micro-batches, all ranks) normalize the loss.
        num_distilled = dist_utils.all_reduce(
            float(sum(int(b["distill_mask"].sum()) for b in group)), info
        )
        num_labels = dist_utils.all_reduce(
            float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in group)), info
        )
        step_loss = torch.zeros((), device=self.device)
        if self.cross is not None:
            self.alignment.update(group)
        for index, batch in enumerate(group):
            # the distilled rows found on the host: no nonzero() on the device
            batch = with_position_rows(batch, config.alpha, pin=self.dataset.pin_memory)
            batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            last = index == len(group) - 1
            no_sync = parallel.no_sync(self.objective, sync=last)
            amp = (
                torch.autocast(self.device.type, dtype=self.autocast)
                if self.autocast is not None
                else None
            )
            with no_sync or contextlib.nullcontext(), amp or contextlib.nullcontext():
                loss = self.batch_loss(self.objective, batch, num_distilled, num_labels)
            (loss * info.world_size).backward()  # DDP averages over ranks; counts are global
            step_loss += loss.detach()
        if config.max_grad_norm > 0:
            self.grad_norm = parallel.clip_grad_norm(self.model, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        local_tokens = float(sum(int(b["attention_mask"].sum()) for b in group))
        step_tokens = int(dist_utils.all_reduce(local_tokens, info))
        self.tokens += step_tokens
        self.pending_loss = step_loss
        return step_tokens

    def _reduce_metrics(self) -> float:
        """The last step's loss summed over ranks into ``self.loss`` (every rank calls it), and
        its gradient norm: the one host sync of the metrics, once per log step / save."""
        if self.pending_loss is not None:
            self.loss = dist_utils.all_reduce(float(self.pending_loss), self.info)
            self.pending_loss = None
        return float(self.grad_norm)

    def _log_train(self, grad_norm: float, tokens_per_s: float) -> None:
        entry = {
            "kind": "train",
            "step": self.step,
            "epoch": self.dataset.epoch,
            "loss": self.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens": self.tokens,
            "tokens_per_s": tokens_per_s,
            "elapsed_s": time.perf_counter() - self.started,
        }
        if self.cross is not None:
            entry.update(self.alignment.as_dict())
        self.metrics.log(entry)

    def _evaluate(self) -> None:
        from kdcache.trainer.evaluation import evaluate_model

        self.last_eval = evaluate_model(
            self.model,
            self.cache,
            split=self.eval_split,
            temperature=self.temperature,
            batch_size=self.config.batch_size,
            max_sequences=self.config.eval_sequences,
            chunk_size=self.config.chunk_size,
            device=self.device,
            autocast=self.autocast,
        )
        self.model.train()
        entry = {"kind": "eval", "step": self.step, "split": self.eval_split, **self.last_eval}
        self.metrics.log(entry)

    def _save(self, name: str, resumable: bool = True) -> Path:
        """Gather every rank's data cursor and RNG state; rank 0 writes the checkpoint.

        ``resumable``: a step-N checkpoint (with the optimizer; older ones pruned to
        --save-total-limit); else final/, the model alone in --export-dtype.
        """
        self._reduce_metrics()  # the checkpoint records the last step's loss
        data_states = dist_utils.gather_objects(self.dataset.state_dict(), self.info)
        rng_states = dist_utils.gather_objects(rng_state(), self.info)
        path = self.out / name
        state: dict[str, Any] = {}
        if self.info.is_main:
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "loss": self.loss,
                "scheduler": self.scheduler.state_dict(),
                "data": data_states,
                "rng": rng_states,
                "config": self.config.to_dict(),
                "world_size": self.info.world_size,
                "total_steps": self.total_steps,
            }
        if self.config.fsdp:
            return self._save_fsdp(name, resumable, state if self.info.is_main else {})
        if self.info.is_main:
            weights = None
            if resumable:
                state["optimizer"] = self.optimizer.state_dict()
            else:
                weights = export_state_dict(self.model, self.config.export_dtype)
            path = save_checkpoint(self.out, name, self.model, self.tokenizer, state, weights)
            if resumable:
                prune_checkpoints(self.out, self.config.save_total_limit)
        dist_utils.barrier(self.info)
        return path

    def _save_fsdp(self, name: str, resumable: bool, state: dict[str, Any]) -> Path:
        """--fsdp: step-N sharded (every rank writes), final/ gathered and written by rank 0."""
        if resumable:
            path = save_sharded(
                self.out, name, self.model, self.optimizer, self.tokenizer, state, self.info
            )
            if self.info.is_main:
                prune_checkpoints(self.out, self.config.save_total_limit)
            return path
        weights = full_weights(self.model)  # a collective: every rank
        path = self.out / name
        if self.info.is_main:
            weights = cast_weights(weights, self.config.export_dtype)
            path = save_checkpoint(self.out, name, self.model, self.tokenizer, state, weights)
        dist_utils.barrier(self.info)
        return path
