"""Cached vs online distillation: step time from the cache vs the teacher's forward in each step.

    python bench/bench_online.py                         # vocab 32k, batch 4 x 256, 2 threads
    python bench/bench_online.py --teacher-hidden 1024 --teacher-layers 8

Same student, same batch, same loss (AKL), both through ``DistillObjective`` with the chunked
lm_head, forward + backward (no optimizer: identical in both):

    cached   top-k + tail mass read from the batch (k = 64), sparse AKL
    online   the teacher's body + lm_head run inside the step (no_grad), full-vocabulary AKL

Median of --reps interleaved repetitions after one warm-up each. The ratio online / cached is
what every training run pays for not having a cache; the cache pays the teacher once.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdcache.cache.extraction.heads import split_head
from kdcache.trainer.objective import DistillObjective, batch_loss
from kdcache.trainer.targets import DenseTeacherTarget, LossOptions, TopkBucketTarget


def _llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config)


def _batch(teacher, vocab: int, batch: int, seq: int, top_k: int) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, vocab, (batch, seq))
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(input_ids=input_ids).logits.float(), -1)
    top = logprobs.topk(top_k, dim=-1)
    labels = torch.cat([input_ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "topk_ids": top.indices,
        "topk_logprobs": top.values,
        "tail_mass": (1 - top.values.exp().sum(-1)).clamp(min=0),
        "distill_mask": torch.ones_like(input_ids, dtype=torch.bool),
    }


def _step(objective: DistillObjective, batch: dict[str, torch.Tensor]) -> float:
    count = float(batch["distill_mask"].sum())
    start = time.perf_counter()
    loss = batch_loss(objective, batch, count, count)
    loss.backward()
    elapsed = time.perf_counter() - start
    objective.model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = _llama(args.vocab, args.teacher_hidden, args.teacher_layers, seed=1).eval()
    teacher.requires_grad_(False)
    student = _llama(args.vocab, args.student_hidden, args.student_layers, seed=0)
    batch = _batch(teacher, args.vocab, args.batch, args.seq, args.top_k)
    common = dict(alpha=0.0, chunk_size=args.chunk_size, chunked=True)
    options = LossOptions(kind="akl", mu=0.5, temperature=1.0)
    online = DenseTeacherTarget(teacher, split_head(teacher), args.vocab)
    variants = {
        "cached": DistillObjective(student, TopkBucketTarget(), options, **common),
        "online": DistillObjective(student, online, options, **common),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for objective in variants.values():
        _step(objective, batch)  # warm-up
    for _ in range(args.reps):
        for name, objective in variants.items():
            times[name].append(_step(objective, batch))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    print(
        f"student {count(student) / 1e6:.1f}M params, teacher {count(teacher) / 1e6:.1f}M, "
        f"vocab {args.vocab}, batch {args.batch} x {args.seq}, k={args.top_k}, "
        f"{args.threads} threads, median of {args.reps}"
    )
    cached = statistics.median(times["cached"])
    for name in variants:
        median = statistics.median(times[name])
        print(f"{name:7s} step {median * 1000:9.1f} ms   ratio to cached {median / cached:5.2f}x")


if __name__ == "__main__":
    main()
