"""``evaluate(config)``: held-out quality of one or several students against a cache.

Every cache reports the same measures, each with one meaning (docs/LOSSES.md, "Held-out
measures"); a measure the cache's storage mode cannot give is ``None`` ("n/a"), never another
quantity under the same name:

* ``ce`` / ``ppl``: next-token cross-entropy (temperature 1) on the real next tokens and its exp;
* ``top1``: how often the student's most likely token is the teacher's (needs a stored top-1:
  n/a on a ``samples`` cache);
* ``fkl_bucket`` / ``rkl_bucket``: forward / reverse KL over the top-k + tail bucket (a lower
  bound of the full KL; n/a on a ``samples`` cache);
* ``fkl_unbiased``: the unbiased estimate of the full forward KL from the tail samples (n/a on a
  ``topk_bucket`` cache);
* with a teacher model (``--teacher``): ``fkl_full`` / ``rkl_full``, the exact KLs to the
  teacher's full distribution (its own forward on the same sequences);
* ``bpb``: bits per byte of the held-out text, each student on its own tokenization, so students
  with another tokenizer (``--cross-tokenizer``) compare on it; for them the teacher measures
  above are n/a and ``ce`` / ``ppl`` are on their own tokens.

The divergences are at the cache's temperature, averaged over distilled positions. The lm_head
runs chunk by chunk over positions, so memory stays O(chunk x vocab).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kdcache.cache.errors import CacheError
from kdcache.cache.extraction.heads import body_of, resolve_head
from kdcache.trainer.config import EvalConfig
from kdcache.trainer.data import IGNORE_INDEX, collate_records
from kdcache.trainer.targets import MEASURES, DenseTeacherTarget, TeacherTarget, target_for_cache

FULL_MEASURES: tuple[str, ...] = ("fkl_full", "rkl_full")  # with --teacher only
METRICS: tuple[str, ...] = ("ce", "ppl", *MEASURES)
METRIC_LABELS: dict[str, str] = {
    "ce": "CE (nats)",
    "ppl": "perplexity",
    "top1": "top-1 agreement",
    "fkl_bucket": "FKL, top-k + bucket",
    "rkl_bucket": "RKL, top-k + bucket",
    "fkl_unbiased": "FKL, unbiased (samples)",
    "fkl_full": "FKL to full teacher",
    "rkl_full": "RKL to full teacher",
    "bpb": "bits per byte",
}
DISPLAY_ORDER: tuple[str, ...] = (*METRICS, "bpb", *FULL_MEASURES)


def format_metric(value: float | None, width: int = 0) -> str:
    """``value`` with 4 decimals, or "n/a" for a measure the cache cannot give."""
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.4f}"


def heldout_keys(metrics: dict[str, Any]) -> list[str]:
    """The measures of ``metrics`` to print, in display order (every cache has the same)."""
    return [name for name in DISPLAY_ORDER if name in metrics]


def _batches(cache, target: TeacherTarget, split: str, batch_size: int, max_sequences: int | None):
    group = []
    for seen, record in enumerate(cache.sequences(split)):
        if max_sequences is not None and seen >= max_sequences:
            break
        group.append(record)
        if len(group) == batch_size:
            yield collate_records(group, target)
            group = []
    if group:
        yield collate_records(group, target)


def _states(model: nn.Module, chunked: bool, batch: dict, autocast) -> torch.Tensor:
    """(B*T, H) body hidden states when the head splits exactly, else (B*T, V) logits."""
    amp = torch.autocast(batch["input_ids"].device.type, dtype=autocast, enabled=bool(autocast))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with amp:
        states = body_of(model)(**inputs).last_hidden_state if chunked else model(**inputs).logits
    return states.reshape(-1, states.shape[-1])


def _head(model: nn.Module, device: torch.device):
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    return resolve_head(model, torch.arange(min(8, vocab_size), device=device).unsqueeze(0))


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    cache,
    *,
    split: str = "holdout",
    temperature: float = 1.0,
    batch_size: int = 8,
    max_sequences: int | None = None,
    chunk_size: int = 1024,
    device: torch.device | None = None,
    autocast: torch.dtype | None = None,
    teacher: nn.Module | None = None,
) -> dict[str, float | None]:
    """Metrics of ``model`` on ``split`` (see the module docstring); leaves the model in eval mode.

    ``teacher`` (optional, same tokenizer, on ``device``) adds ``fkl_full`` / ``rkl_full``.
    """
    device = device or next(model.parameters()).device
    model.eval()
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    head = _head(model, device)
    targets: list[TeacherTarget] = [target_for_cache(cache.manifest)]
    if teacher is not None:
        targets.append(DenseTeacherTarget(teacher.eval(), _head(teacher, device), vocab_size))
    sums: dict[str, float] = {}
    ce_sum, num_positions, num_labels, num_sequences = 0.0, 0, 0, 0
    for batch in _batches(cache, targets[0], split, batch_size, max_sequences):
        batch = {key: value.to(device) for key, value in batch.items()}
        rows = batch["distill_mask"].reshape(-1).nonzero().squeeze(-1)  # (N,)
        states = _states(model, head is not None, batch, autocast)[rows]
        teacher_rows = [target.select(batch, rows, vocab_size) for target in targets]
        labels = batch["labels"].reshape(-1)[rows]
        for start in range(0, rows.numel(), chunk_size):
            end = min(start + chunk_size, rows.numel())
            logits = head.logits(states[start:end]) if head is not None else states[start:end]
            logits = logits.float()  # (C, V)
            for target, selected in zip(targets, teacher_rows, strict=True):
                chunk = {name: tensor[start:end] for name, tensor in selected.items()}
                for name, values in target.evaluate_rows(logits, chunk, temperature).items():
                    sums[name] = sums.get(name, 0.0) + float(values.sum())
            has_label = labels[start:end] != IGNORE_INDEX
            ce = F.cross_entropy(
                logits, labels[start:end], ignore_index=IGNORE_INDEX, reduction="sum"
            )
            ce_sum += float(ce)
            num_labels += int(has_label.sum())
        num_positions += int(rows.numel())
        num_sequences += int(batch["input_ids"].shape[0])
    if num_positions == 0:
        raise CacheError(f"split {split!r} of the cache has no distilled positions to evaluate")
    ce = ce_sum / max(num_labels, 1)
    metrics: dict[str, float | None] = {"ce": ce, "ppl": math.exp(min(ce, 700.0))}
    shown = MEASURES + (FULL_MEASURES if teacher is not None else ())
    metrics.update({name: sums[name] / num_positions if name in sums else None for name in shown})
    metrics.update(positions=num_positions, label_positions=num_labels, sequences=num_sequences)
    return metrics


def trained_cross_tokenizer(student: str) -> bool:
    """True when the run that wrote checkpoint ``student`` trained with ``--cross-tokenizer``.

    Reads the run's ``run.json`` in the checkpoint directory or the one above it (``<out>/final``,
    ``<out>/step-N``); a hub id or a checkpoint without a run says nothing (False).
    """
    from kdcache.trainer.checkpoint import RUN_FILE

    directory = Path(student)
    for candidate in (directory / RUN_FILE, directory.parent / RUN_FILE):
        if directory.is_dir() and candidate.is_file():
            try:
                run = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return False
            return bool(isinstance(run, dict) and run.get("cross_tokenizer"))
    return False


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Evaluate every student of ``config`` and write the JSON report.

    Returns ``{"cache", "split", "students": {student: metrics}, "json": [paths written]}``.
    """
    from kdcache.cache import open_cache
    from kdcache.cache.build.teacher import resolve_device
    from kdcache.trainer.config import reader_options
    from kdcache.trainer.cross_tokenizer.bits_per_byte import held_out_byte_metrics
    from kdcache.trainer.student import (
        autocast_dtype,
        check_tokenizer,
        check_vocab_size,
        load_student_model,
        load_student_tokenizer,
        load_teacher,
    )

    cache = open_cache(config.cache, **reader_options(config))
    if config.split not in cache.manifest["splits"]:
        raise CacheError(
            f"cache {config.cache} has no {config.split!r} split (it has "
            f"{', '.join(cache.manifest['splits'])}); pass --split"
        )
    device = resolve_device(config.device)
    autocast = autocast_dtype(config.dtype, device)
    temperature = float(cache.manifest["temperature"])
    teacher = None
    if config.teacher is not None:
        teacher = load_teacher(config.teacher, cache.path, cache.manifest, torch.float32)
        teacher.to(device)
    same_tokenizer = {}  # cheap checks of every student before any evaluation
    for student in config.students:
        tokenizer = load_student_tokenizer(student, cache.path)  # cache.path: a local copy
        cross = config.cross_tokenizer or trained_cross_tokenizer(student)
        same_tokenizer[student] = check_tokenizer(
            tokenizer, cache.path, cache.manifest, cross_tokenizer=cross
        )
    results: dict[str, dict[str, float | None]] = {}
    for student in config.students:  # one model in memory at a time
        model, _ = load_student_model(student)
        tokenizer = load_student_tokenizer(student, cache.path)
        check_vocab_size(model, tokenizer)
        byte_metrics = held_out_byte_metrics(
            model.to(device), cache, config.split, tokenizer, same_tokenizer=same_tokenizer[student],
            max_sequences=config.max_sequences, batch_size=config.batch_size, device=device,
        )  # fmt: skip
        if not same_tokenizer[student]:  # another tokenizer: its own tokens, bits per byte
            unsupported = MEASURES + (FULL_MEASURES if teacher is not None else ())
            results[student] = dict.fromkeys(unsupported) | byte_metrics  # None: "n/a"
            del model
            continue
        results[student] = byte_metrics | evaluate_model(
            model.to(device),
            cache,
            split=config.split,
            temperature=temperature,
            batch_size=config.batch_size,
            max_sequences=config.max_sequences,
            chunk_size=config.chunk_size,
            device=device,
            autocast=autocast,
            teacher=teacher,
        )
        del model
    report: dict[str, Any] = {
        "cache": str(config.cache),
        "split": config.split,
        "students": results,
        "json": [],
    }
    targets = [Path(config.json_path)] if config.json_path else []
    if not targets:
        targets = [Path(s) / f"eval-{config.split}.json" for s in results if Path(s).is_dir()]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = {key: report[key] for key in ("cache", "split", "students")}
        target.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        report["json"].append(str(target))
    return report


def format_table(report: dict[str, Any]) -> str:
    """The students side by side: one row per metric, one column per student ("n/a": none)."""
    names = list(report["students"])
    students = report["students"]
    shown: list[str] = []
    for name in names:
        shown += [metric for metric in heldout_keys(students[name]) if metric not in shown]
    shown.sort(key=DISPLAY_ORDER.index)
    label_width = max(len(METRIC_LABELS[metric]) for metric in shown)
    width = max(10, *(len(name) for name in names))
    header = f"{'split ' + report['split']:<{label_width}}"
    lines = [header + "".join(f"  {name:>{width}}" for name in names)]
    for metric in shown:
        cells = "".join(f"  {format_metric(students[name].get(metric), width)}" for name in names)
        lines.append(f"{METRIC_LABELS[metric]:<{label_width}}{cells}")
    positions = [students[name]["positions"] for name in names if "positions" in students[name]]
    if positions:
        lines.append(f"({positions[0]} distilled positions)")
    if any("positions" not in students[name] for name in names):
        lines.append("(students with another tokenizer: CE / perplexity on their own tokens)")
    return "\n".join(lines)
