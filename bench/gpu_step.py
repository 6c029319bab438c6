"""KD training step vs CE step on one device: time, tokens/s and peak memory, side by side.

    python bench/gpu_step.py --device cuda --vocab 32000 128000     # bench/gpu_check.sh
    python bench/gpu_step.py --device cpu --vocab 2048 --batch 1 --seq 64 --hidden 64   # dry run

A Llama student (``--hidden``, ``--layers``, untied head) takes forward + backward steps (no
optimizer: it is the same for every variant) through the trainer's objective
(``DistillObjective`` + ``batch_loss`` on ``collate_records`` batches, chunked head), on a
synthetic teacher's records: ``ce`` (alpha 1, tokens only), ``kd-top64`` (AKL on a top-64 +
bucket cache) and ``kd-default`` (AKL on top-24 + 16 tail samples, the build default). Steps are
interleaved over ``--reps`` after a warm-up; on CUDA the peak memory is
``torch.cuda.max_memory_allocated`` over one step above what was allocated before it (on the CPU
it is not measured: n/a). Each result is also printed as a ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

VARIANTS = {"ce": (64, 0, 1.0), "kd-top64": (64, 0, 0.0), "kd-default": (24, 16, 0.0)}


def synthetic_records(vocab: int, batch: int, seq: int, top_k: int, samples: int, seed: int = 0):
    """``batch`` SequenceRecords of a peaked random teacher (top-k, tail mass, tail draws)."""
    from kdcache.cache.records import SequenceRecord

    rng = np.random.default_rng(seed)
    records = []
    for index in range(batch):
        logits = torch.from_numpy(4.0 * rng.standard_normal((seq, vocab), dtype=np.float32))
        log_probs = torch.log_softmax(logits, -1)
        values, ids = log_probs.topk(top_k, -1)
        tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
        extra = {}
        if samples:
            drawn = torch.from_numpy(rng.integers(top_k, vocab, (seq, samples)))
            extra = dict(tail_ids=drawn.numpy().astype(np.int32),
                         tail_logprobs=log_probs.gather(1, drawn).numpy())  # fmt: skip
        records.append(SequenceRecord(
            sequence_id=index, input_ids=rng.integers(0, vocab, seq).astype(np.int32),
            topk_ids=ids.numpy().astype(np.int32), topk_logprobs=values.numpy(),
            tail_mass=tail.numpy(), positions=np.arange(seq, dtype=np.int32), **extra,
        ))  # fmt: skip
    return records


def student(vocab: int, hidden: int, layers: int, seq: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64), max_position_embeddings=seq,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(device)


def make_step(args, vocab: int, variant: str):
    """A closure running one forward + backward of ``variant``; returns the loss."""
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.objective import DistillObjective, batch_loss
    from kdcache.trainer.targets import LossOptions, target_for_cache

    top_k, samples, alpha = VARIANTS[variant]
    model = student(vocab, args.hidden, args.layers, args.seq, args.device)
    records = synthetic_records(vocab, args.batch, args.seq, top_k, samples)
    target = target_for_cache({"top_k": top_k, "tail_samples": samples})  # the storage mode
    batch = {k: v.to(args.device) for k, v in collate_records(records, target).items()}
    objective = DistillObjective(model, target, LossOptions(kind="akl"), alpha=alpha,
                                 chunk_size=args.chunk, chunked=True)  # fmt: skip
    counts = float(batch["distill_mask"].sum()), float((batch["labels"] != -100).sum())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else None

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if autocast is not None:
            with autocast:
                loss = batch_loss(objective, batch, *counts)
        else:
            loss = batch_loss(objective, batch, *counts)
        loss.backward()
        return float(loss.detach())

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args, vocab: int) -> dict[str, dict[str, float | None]]:
    steps = {variant: make_step(args, vocab, variant) for variant in VARIANTS}
    peak: dict[str, float | None] = {}
    for variant, step in steps.items():  # warm-up, and the memory of one step
        step()
        _sync(args.device)
        peak[variant] = None
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak[variant] = (torch.cuda.max_memory_allocated() - before) / 2**20
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.reps):
        for variant, step in steps.items():
            _sync(args.device)
            start = time.perf_counter()
            step()
            _sync(args.device)
            times[variant].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    return {
        variant: {
            "seconds": min(times[variant]),
            "tokens_per_s": tokens / min(times[variant]),
            "peak_mib": peak[variant],
        }
        for variant in VARIANTS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"student llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x "
          f"{args.seq}, chunk {args.chunk}, {args.device}; min of {args.reps} interleaved steps",
          flush=True)  # fmt: skip
    for vocab in args.vocab:
        results = measure(args, vocab)
        ce = results["ce"]
        for variant in ("kd-top64", "kd-default"):
            kd = results[variant]
            memory = (kd["peak_mib"] / ce["peak_mib"]) if ce["peak_mib"] else None
            row = {
                "bench": "step", "vocab": vocab, "variant": variant,
                "kd_over_ce_time": kd["seconds"] / ce["seconds"], "kd_tokens_per_s": kd["tokens_per_s"],
                "ce_tokens_per_s": ce["tokens_per_s"], "kd_peak_mib": kd["peak_mib"],
                "ce_peak_mib": ce["peak_mib"], "kd_over_ce_memory": memory,
            }  # fmt: skip
            print(f"vocab {vocab} {variant}: step time KD / CE {row['kd_over_ce_time']:.3f}, "
                  f"{kd['tokens_per_s']:.0f} vs {ce['tokens_per_s']:.0f} tokens/s, peak memory "
                  + (f"{kd['peak_mib']:.0f} / {ce['peak_mib']:.0f} MiB" if memory else "n/a"),
                  flush=True)  # fmt: skip
            print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
