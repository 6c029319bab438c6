"""``train(config)``: distill one student from a cache (or train it on the tokens alone).

Everything that can refuse (config, cache, temperature, student, tokenizer, out dir) is checked
before the first byte is written. The run directory then holds ``run.json`` (the config),
``metrics.jsonl`` (one JSON line per logged step / eval), ``step-N/`` checkpoints and ``final/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.heads import resolve_head
from kdcache.trainer import distributed as dist_utils
from kdcache.trainer.checkpoint import (
    FINAL,
    latest_checkpoint,
    load_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kdcache.trainer.config import TrainConfig
from kdcache.trainer.data import IGNORE_INDEX, CacheDataset
from kdcache.trainer.objective import DistillObjective
from kdcache.trainer.student import (
    autocast_dtype,
    check_tokenizer,
    check_vocab_size,
    load_student_model,
    load_student_tokenizer,
)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


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


def _check_out_dir(config: TrainConfig) -> Path | None:
    """Refuse an out dir we must not write into; return the checkpoint to resume from."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory")
    run_file = out / RUN_FILE
    holds_files = out.is_dir() and any(out.iterdir())
    if config.resume:
        if not run_file.is_file():
            raise ConfigError(f"nothing to resume in {out} (no {RUN_FILE}); drop --resume")
        stored = json.loads(run_file.read_text(encoding="utf-8"))
        differences = config.differences(stored)
        if differences:
            raise ConfigError(
                f"--resume: {out} holds a run with other settings ({'; '.join(differences)}); "
                "resume with the same settings or use --overwrite"
            )
        return latest_checkpoint(out)
    if holds_files and not run_file.is_file():  # never delete what is not a kdcache run
        raise ConfigError(
            f"{out} already holds other files (no {RUN_FILE}); choose an empty or new --out"
        )
    if holds_files and not config.overwrite:
        raise ConfigError(
            f"{out} already holds a training run; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out"
        )
    return None


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


def _lr_lambda(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


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


def _append_metrics(out: Path, entry: dict[str, Any]) -> None:
    with open(out / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def _truncate_metrics(out: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.student`` on ``config.cache`` and return where the result is.

    Under torchrun (``WORLD_SIZE > 1``) every rank calls this; only rank 0 writes.
    """
    info = dist_utils.init_distributed(config.device)
    try:
        return _train(config, info)
    finally:
        dist_utils.shutdown(info)


def _train(config: TrainConfig, info: dist_utils.DistInfo) -> TrainResult:
    from kdcache.cache import open_cache

    started = time.perf_counter()
    cache = open_cache(config.cache)
    temperature = _cache_temperature(config, cache.manifest)
    cache.shards(config.split)  # CacheError naming the splits when it is missing
    resume_from = _check_out_dir(config)
    if resume_from is not None:
        model, source = load_student_model(str(resume_from), seed=config.seed)[0], "checkpoint"
        tokenizer = load_student_tokenizer(str(resume_from), config.cache)
    else:
        model, source = load_student_model(config.student, seed=config.seed)
        tokenizer = load_student_tokenizer(config.student, config.cache)
    check_tokenizer(tokenizer, config.cache, cache.manifest)
    check_vocab_size(model, tokenizer)
    teacher = None if config.teacher is None else _load_teacher(config, cache.manifest)
    dataset = CacheDataset(
        cache,
        config.split,
        batch_size=config.batch_size,
        max_tokens=config.max_tokens,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=config.num_workers,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer,
        pad_id=0,
    )
    eval_split = _eval_split(config, cache)

    out = Path(config.out)
    dist_utils.barrier(info)  # every rank checked the out dir before rank 0 writes into it
    if info.is_main:
        if config.overwrite and (out / RUN_FILE).is_file():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        run_json = json.dumps(config.to_dict(), indent=2)
        (out / RUN_FILE).write_text(run_json + "\n", encoding="utf-8")
    dist_utils.barrier(info)

    device = info.device
    model.to(device)
    model.eval()
    probe = torch.arange(min(8, len(tokenizer)), device=device).unsqueeze(0)
    chunked = _chunked_available() and resolve_head(model, probe) is not None
    model.train()
    objective: nn.Module = DistillObjective(
        model,
        kind=config.loss,
        mu=config.mu,
        temperature=temperature,
        alpha=config.alpha,
        chunk_size=config.chunk_size,
        chunked=chunked,
        teacher=None if teacher is None else teacher.to(device),
        teacher_chunked=teacher is not None and resolve_head(teacher, probe) is not None,
    )
    if info.distributed:
        ids = [info.device.index] if device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)

    if config.steps is not None:
        total_steps = config.steps
    else:
        per_epoch = min(dataset.num_batches(rank) for rank in range(info.world_size))
        total_steps = math.ceil((config.epochs or 1) * per_epoch / config.grad_accum)
        if total_steps < 1:
            raise CacheError(f"split {config.split!r} of the cache holds no sequences to train on")
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(config.warmup_steps, total_steps)
    )

    step, tokens, last_loss = 0, 0, None
    torch.manual_seed(config.seed)
    if resume_from is not None:
        state = load_training_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if len(state["data"]) != info.world_size:
            raise ConfigError(
                f"the checkpoint was written by {len(state['data'])} ranks, this run has "
                f"{info.world_size}; resume with the same world size"
            )
        dataset.load_state_dict(state["data"][info.rank])
        set_rng_state(state["rng"][info.rank])
        step, tokens, last_loss = int(state["step"]), int(state["tokens"]), state.get("loss")
    if config.resume and info.is_main:  # lines logged after the checkpoint are redone
        _truncate_metrics(out, step)

    from kdcache.trainer.evaluate import evaluate_model

    last_eval = None
    autocast = autocast_dtype(config.dtype, device)
    max_epochs = config.epochs if config.steps is None else None
    progress = _progress(config, info, total_steps, step)
    batches = _micro_batches(dataset, max_epochs, config.grad_accum)
    window_tokens, window_start = 0, time.perf_counter()
    while step < total_steps:
        group = next(batches, [])
        if dist_utils.all_reduce(float(len(group)), info, op="min") < 1:
            break  # some rank ran out of data (epochs mode): stop together
        num_distilled = dist_utils.all_reduce(
            float(sum(int(b["distill_mask"].sum()) for b in group)), info
        )
        num_labels = dist_utils.all_reduce(
            float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in group)), info
        )
        step_loss = 0.0
        for index, batch in enumerate(group):
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            sync = index == len(group) - 1 or not info.distributed
            no_sync = contextlib.nullcontext() if sync else objective.no_sync()
            amp = (
                torch.autocast(device.type, dtype=autocast)
                if autocast is not None
                else contextlib.nullcontext()
            )
            with no_sync, amp:
                loss = objective(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["labels"],
                    batch["topk_ids"],
                    batch["topk_logprobs"],
                    batch["tail_mass"],
                    batch["distill_mask"],
                    num_distilled,
                    num_labels,
                )
            (loss * info.world_size).backward()  # DDP averages over ranks; counts are global
            step_loss += float(loss.detach())
        grad_norm = (
            float(nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
            if config.max_grad_norm > 0
            else float("nan")
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_tokens = int(
            dist_utils.all_reduce(float(sum(int(b["attention_mask"].sum()) for b in group)), info)
        )
        tokens += step_tokens
        window_tokens += step_tokens
        last_loss = dist_utils.all_reduce(step_loss, info)
        elapsed = time.perf_counter() - window_start
        tokens_per_s = window_tokens / elapsed if elapsed > 0 else 0.0
        progress.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        progress.update(1)
        if info.is_main and (step % config.log_every == 0 or step == total_steps):
            entry = {
                "kind": "train",
                "step": step,
                "epoch": dataset.epoch,
                "loss": last_loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens": tokens,
                "tokens_per_s": tokens_per_s,
                "elapsed_s": time.perf_counter() - started,
            }
            _append_metrics(out, entry)
        if eval_split and info.is_main and (step % config.eval_every == 0 or step == total_steps):
            last_eval = evaluate_model(
                model,
                cache,
                split=eval_split,
                temperature=temperature,
                batch_size=config.batch_size,
                max_sequences=config.eval_sequences,
                chunk_size=config.chunk_size,
                device=device,
                autocast=autocast,
            )
            model.train()
            _append_metrics(out, {"kind": "eval", "step": step, "split": eval_split, **last_eval})
        if config.save_every and step % config.save_every == 0 and step < total_steps:
            _save(
                out,
                f"step-{step}",
                model,
                tokenizer,
                config,
                info,
                optimizer,
                scheduler,
                dataset,
                step,
                tokens,
                last_loss,
            )
    progress.close()
    final = _save(
        out,
        FINAL,
        model,
        tokenizer,
        config,
        info,
        optimizer,
        scheduler,
        dataset,
        step,
        tokens,
        last_loss,
    )
    resumed = None if resume_from is None else int(load_training_state(resume_from)["step"])
    return TrainResult(
        out=out,
        final=final,
        steps=step,
        tokens=tokens,
        loss=last_loss,
        seconds=time.perf_counter() - started,
        resumed_from=resumed,
        student_source=source,
        eval=last_eval,
        rank=info.rank,
    )


def _load_teacher(config: TrainConfig, manifest: dict[str, Any]) -> nn.Module:
    """The online teacher, frozen, with the cache's tokenizer (same sequences, same ids)."""
    from transformers import AutoModelForCausalLM

    try:
        teacher_tokenizer = load_student_tokenizer(config.teacher, config.cache)
        check_tokenizer(teacher_tokenizer, config.cache, manifest)
    except ConfigError as error:
        message = str(error).replace("student's", "--teacher's").replace("student ", "--teacher ")
        raise ConfigError(message.replace("not found", "could not be loaded (not found)")) from None
    bf16 = autocast_dtype(config.dtype, torch.device(resolve_device_name(config)))
    try:
        teacher = AutoModelForCausalLM.from_pretrained(config.teacher, dtype=bf16 or torch.float32)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise ConfigError(
            f"--teacher {config.teacher!r} could not be loaded ({first_line}); pass a "
            "save_pretrained directory or a hub id"
        ) from None
    teacher.eval().requires_grad_(False)
    return teacher


def resolve_device_name(config: TrainConfig) -> str:
    if config.device != "auto":
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _chunked_available() -> bool:
    try:
        from kdcache.trainer.chunked import chunked_distill_loss  # noqa: F401
    except ImportError:
        return False
    return True


def _eval_split(config: TrainConfig, cache) -> str | None:
    if not config.eval_every:
        return None
    if config.eval_split not in cache.manifest["splits"] or not cache.shards(config.eval_split):
        raise ConfigError(
            f"--eval-every needs a {config.eval_split!r} split but the cache has "
            f"{', '.join(cache.manifest['splits'])}; build with a holdout or drop --eval-every"
        )
    return config.eval_split


def _progress(config: TrainConfig, info: dist_utils.DistInfo, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        desc=f"train {config.loss}",
        disable=not (config.progress and info.is_main),
        dynamic_ncols=True,
    )


def _save(
    out, name, model, tokenizer, config, info, optimizer, scheduler, dataset, step, tokens, loss
) -> Path:
    """Gather every rank's data cursor and RNG state; rank 0 writes the checkpoint."""
    data_states = dist_utils.gather_objects(dataset.state_dict(), info)
    rng_states = dist_utils.gather_objects(rng_state(), info)
    path = out / name
    if info.is_main:
        state = {
            "step": step,
            "tokens": tokens,
            "loss": loss,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": data_states,
            "rng": rng_states,
            "config": config.to_dict(),
            "world_size": info.world_size,
        }
        path = save_checkpoint(out, name, model, tokenizer, state)
    dist_utils.barrier(info)
    return path
