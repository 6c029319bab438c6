"""``evaluate(config)``: held-out quality of one or several students against a cache.

Metrics (on the ``holdout`` split by default):

* ``ce`` / ``ppl``: next-token cross-entropy (temperature 1) on the real next tokens and its exp;
* ``fkl`` / ``rkl``: sparse forward / reverse KL to the cached teacher (bucket tail, at the
  cache's temperature), mean over distilled positions; on a sampled cache (top-k 0) ``fkl`` is
  the unbiased estimate from the tail samples and ``rkl`` is absent (it has no estimator there);
* ``top1``: how often the student's most likely token is the teacher's most likely token (absent
  on a sampled cache, which does not know the teacher's most likely token);
* with a teacher model (``--teacher``): ``full_fkl`` / ``full_rkl``, the forward / reverse KL to
  the teacher's full-vocabulary distribution (its own forward on the same sequences), the
  reference a sparse cache is measured against.

The lm_head runs chunk by chunk over positions, so memory stays O(chunk x vocab).
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
from kdcache.cache.heads import body_of, resolve_head
from kdcache.trainer.config import EvalConfig
from kdcache.trainer.data import IGNORE_INDEX, collate_records
from kdcache.trainer.objective import fold_out_of_vocab

METRICS: tuple[str, ...] = ("ce", "ppl", "fkl", "rkl", "top1")


def _batches(cache, split: str, batch_size: int, max_sequences: int | None):
    group = []
    for seen, record in enumerate(cache.sequences(split)):
        if max_sequences is not None and seen >= max_sequences:
            break
        group.append(record)
        if len(group) == batch_size:
            yield collate_records(group)
            group = []
    if group:
        yield collate_records(group)


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
) -> dict[str, float]:
    """Metrics of ``model`` on ``split`` (see the module docstring); leaves the model in eval mode.

    ``teacher`` (optional, same tokenizer, on ``device``) adds ``full_fkl`` / ``full_rkl``.
    """
    from kdcache.trainer.losses import dense_kd_loss, sparse_kd_loss
    from kdcache.trainer.sampled import topk_tail_kd_loss
    from kdcache.trainer.topk_tail import fold_out_of_vocab_samples

    device = device or next(model.parameters()).device
    model.eval()
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    head = _head(model, device)
    teacher_head = None if teacher is None else _head(teacher.eval(), device)
    sums = {"ce": 0.0, "fkl": 0.0, "rkl": 0.0, "top1": 0.0, "full_fkl": 0.0, "full_rkl": 0.0}
    num_positions = num_labels = num_sequences = 0
    sampled = int(cache.manifest["top_k"]) == 0  # tail samples only: no top-1, no RKL
    for batch in _batches(cache, split, batch_size, max_sequences):
        batch = {key: value.to(device) for key, value in batch.items()}
        rows = batch["distill_mask"].reshape(-1).nonzero().squeeze(-1)  # (N,)
        states = _states(model, head is not None, batch, autocast)[rows]
        if teacher is not None:
            teacher_states = _states(teacher, teacher_head is not None, batch, autocast)[rows]
        ids, logprobs, tail = fold_out_of_vocab(
            batch["topk_ids"].flatten(0, 1)[rows],  # (N, k)
            batch["topk_logprobs"].flatten(0, 1)[rows],
            batch["tail_mass"].reshape(-1)[rows],
            vocab_size,
        )
        labels = batch["labels"].reshape(-1)[rows]
        samples = None
        if sampled:  # the FKL estimate from the samples
            samples = fold_out_of_vocab_samples(
                batch["tail_ids"].flatten(0, 1)[rows],
                batch["tail_logprobs"].flatten(0, 1)[rows],
                vocab_size,
            )
        for start in range(0, rows.numel(), chunk_size):
            part = slice(start, start + chunk_size)
            logits = head.logits(states[part]) if head is not None else states[part].float()
            if samples is not None:
                sums["fkl"] += float(
                    topk_tail_kd_loss(
                        logits,
                        ids[part],
                        logprobs[part],
                        tail[part],
                        samples[0][part],
                        samples[1][part],
                        kind="fkl",
                        reduction="sum",
                        temperature=temperature,
                    )
                )
            for kind in ("fkl", "rkl") if samples is None else ():
                sums[kind] += float(
                    sparse_kd_loss(
                        logits,
                        ids[part],
                        logprobs[part],
                        tail[part],
                        kind=kind,
                        reduction="sum",
                        temperature=temperature,
                    )
                )
            if teacher is not None:
                chunk = teacher_states[part]
                full = teacher_head.logits(chunk) if teacher_head is not None else chunk.float()
                full = full[:, :vocab_size]  # a teacher's padding ids beyond the student's: dropped
                for kind in ("fkl", "rkl"):
                    sums[f"full_{kind}"] += float(
                        dense_kd_loss(
                            logits, full, kind=kind, reduction="sum", temperature=temperature
                        )
                    )
            if not sampled:
                sums["top1"] += float((logits.argmax(-1) == ids[part, 0]).sum())
            has_label = labels[part] != IGNORE_INDEX
            if bool(has_label.any()):
                sums["ce"] += float(
                    F.cross_entropy(logits[has_label], labels[part][has_label], reduction="sum")
                )
                num_labels += int(has_label.sum())
        num_positions += int(rows.numel())
        num_sequences += int(batch["input_ids"].shape[0])
    if num_positions == 0:
        raise CacheError(f"split {split!r} of the cache has no distilled positions to evaluate")
    ce = sums["ce"] / max(num_labels, 1)
    metrics = {
        "ce": ce,
        "ppl": math.exp(min(ce, 700.0)),
        "fkl": sums["fkl"] / num_positions,
        "rkl": sums["rkl"] / num_positions,
        "top1": sums["top1"] / num_positions,
        "positions": num_positions,
        "label_positions": num_labels,
        "sequences": num_sequences,
    }
    if sampled:  # no estimator of these on a sampled cache
        del metrics["rkl"], metrics["top1"]
    if teacher is not None:
        metrics["full_fkl"] = sums["full_fkl"] / num_positions
        metrics["full_rkl"] = sums["full_rkl"] / num_positions
    return metrics


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Evaluate every student of ``config`` and write the JSON report.

    Returns ``{"cache", "split", "students": {student: metrics}, "json": [paths written]}``.
    """
    from kdcache.cache import open_cache
    from kdcache.trainer.config import reader_options
    from kdcache.trainer.student import (
        autocast_dtype,
        check_tokenizer,
        check_vocab_size,
        load_student_model,
        load_student_tokenizer,
        load_teacher,
        resolve_device,
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
    for student in config.students:  # cheap checks of every student before any evaluation
        tokenizer = load_student_tokenizer(student, cache.path)  # cache.path: a local copy
        check_tokenizer(tokenizer, cache.path, cache.manifest)
    results: dict[str, dict[str, float]] = {}
    for student in config.students:  # one model in memory at a time
        model, _ = load_student_model(student)
        check_vocab_size(model, load_student_tokenizer(student, cache.path))
        results[student] = evaluate_model(
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
    """The students side by side: one row per metric, one column per student."""
    names = list(report["students"])
    labels = {
        "ce": "CE (nats)",
        "ppl": "perplexity",
        "fkl": "FKL to teacher (top-k + tail)",
        "rkl": "RKL to teacher (top-k + tail)",
        "top1": "top-1 agreement",
        "full_fkl": "FKL to full teacher",
        "full_rkl": "RKL to full teacher",
    }
    first = report["students"][names[0]]
    shown = [metric for metric in (*METRICS, "full_fkl", "full_rkl") if metric in first]
    label_width = max(len(labels[metric]) for metric in shown)
    width = max(10, *(len(name) for name in names))
    header = f"{'split ' + report['split']:<{label_width}}"
    lines = [header + "".join(f"  {name:>{width}}" for name in names)]
    for metric in shown:
        cells = "".join(f"  {report['students'][name][metric]:>{width}.4f}" for name in names)
        lines.append(f"{labels[metric]:<{label_width}}{cells}")
    lines.append(f"({first['positions']} distilled positions)")
    return "\n".join(lines)
