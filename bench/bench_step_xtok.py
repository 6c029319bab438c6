"""Cross-tokenizer KD step time and peak memory vs CE and same-tokenizer KD, side by side.

    python bench/bench_step_xtok.py                  # vocab 32k, batch 4 x 256, 2 threads
    python bench/bench_step_xtok.py --vocab 32000 128000 --reps 5

The student, batch and synthetic teacher of ``bench_step.py``; 30% of the student ids have no
exact teacher match (the ULD term ranks them). Variants (forward + backward, no optimizer):

    hf-ce         model(input_ids, labels=...).loss               (full logits)
    chunked-ce    body -> chunked CE                               (kdcache, fused chunks)
    bucket-k64    body -> chunked sparse AKL, k = 64               (same tokenizer, topk_bucket)
    chunked-exact body -> chunked exact-match AKL, no ULD (every student id has a match, as for
                  a student BPE nested in the teacher's: ULD has nothing to rank and is skipped)
    chunked-xtok  body -> chunked exact-match AKL + ULD, closed-form gradient (cross-tokenizer)
    chunked-alm   body -> chunked chunk-likelihood term (--xtok-loss alm; synthetic chunks of 1
                  to 3 positions, the fused head's chunks cut at chunk boundaries)
    chunked-alm-exact  body -> chunked ALM + exact-match AKL + ULD (--xtok-loss alm+exact)
    naive-xtok    model(input_ids).logits -> cross_tokenizer_kd_loss (full logits, autograd)

Times: minimum wall and median process CPU over --reps interleaved repetitions after a warm-up.
Memory: each variant's first step in a fresh subprocess, peak RSS (VmHWM) minus the RSS before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # the shared student, batch and teacher of the step benchmark

from kdcache.cache.extraction.heads import body_of, split_head
from kdcache.trainer.chunked import chunked_head_loss
from kdcache.trainer.cross_tokenizer.likelihood import ChunkLikelihood, add_chunk_likelihood
from kdcache.trainer.cross_tokenizer.loss import (
    CrossTokenizerLoss,
    cross_tokenizer_kd_loss,
    cross_tokenizer_loss_and_grad,
)
from kdcache.trainer.cross_tokenizer.uld import unmatched_student_ids

VARIANTS = ("hf-ce", "chunked-ce", "bucket-k64", "chunked-exact", "chunked-xtok", "chunked-alm",
            "chunked-alm-exact", "naive-xtok")  # fmt: skip
SAME_TOKENIZER = ("hf-ce", "chunked-ce", "bucket-k64")  # bench_step.py's variants


def cross_rows(vocab: int, topk_ids, topk_logprobs, tail_mass, seed: int = 0):
    """The synthetic teacher seen through an exact-match map that misses 30% of the ids."""
    generator = torch.Generator().manual_seed(seed)
    matched = torch.rand(vocab, generator=generator) >= 0.3  # (V,)
    unmatched = ~matched[topk_ids]  # (N, k)
    probs = topk_logprobs.exp()
    rows = {
        "topk_ids": topk_ids.masked_fill(unmatched, 0),
        "topk_logprobs": topk_logprobs.masked_fill(unmatched, float("-inf")),
        "tail_mass": tail_mass + torch.where(unmatched, probs, 0.0).sum(-1),
        "unmatched_probs": torch.where(unmatched, probs, 0.0).sort(-1, descending=True).values,
    }
    setting = CrossTokenizerLoss(
        matched, "akl", uld_weight=1.0, unmatched_ids=unmatched_student_ids(matched)
    )
    return rows, setting


def chunk_rows(input_ids: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic likelihood chunks over the flat positions: runs of 1 to 3 positions (a few left
    out), the next token as label, a teacher log-likelihood per chunk."""
    generator = torch.Generator().manual_seed(seed)
    n = input_ids.numel()
    sizes = torch.randint(1, 4, (n,), generator=generator)
    chunk = torch.repeat_interleave(torch.arange(n), sizes)[:n]  # (n,) runs of 1-3 equal ids
    chunk = chunk.masked_fill(torch.rand(n, generator=generator) < 0.05, -1)
    size = torch.bincount(chunk.clamp_min(0), minlength=n).float()[chunk.clamp_min(0)]
    labels = torch.roll(input_ids.reshape(-1), -1)
    teacher_ll = -torch.rand(n, generator=generator) * 8 * size
    return {"labels": labels, "alm_chunk": chunk, "alm_teacher_ll": teacher_ll, "alm_size": size}


def make_step(variant: str, model, vocab: int, batch: int, seq: int, chunk: int, k: int):
    if variant in SAME_TOKENIZER:
        return bench_step.make_step(variant, model, vocab, batch, seq, chunk)
    data = bench_step.teacher_batch(vocab, batch, seq, k, 0)
    input_ids = data["input_ids"]
    topk_ids, topk_logprobs, tail_mass = (
        data[name].flatten(0, 1) for name in ("topk_ids", "topk_logprobs", "tail_mass")
    )
    rows, setting = cross_rows(vocab, topk_ids, topk_logprobs, tail_mass)
    if variant == "chunked-exact":
        setting = dataclasses.replace(setting, uld_weight=0.0)
    n = input_ids.numel()
    weight = torch.full((n,), 1.0 / n)
    head, body = split_head(model), body_of(model)
    chunks = chunk_rows(input_ids) if variant.startswith("chunked-alm") else None
    likelihood = ChunkLikelihood(100.0, 1.0)

    def kernel(logits, start, end):
        part = {name: tensor[start:end] for name, tensor in rows.items()}
        loss = grad = None
        if variant != "chunked-alm":
            loss, grad = cross_tokenizer_loss_and_grad(logits, part, setting, weight[start:end])
        if chunks is not None:
            part = {name: tensor[start:end] for name, tensor in chunks.items()}
            loss, grad = add_chunk_likelihood(logits, part, weight[start:end], likelihood,
                                              loss, grad)  # fmt: skip
        return loss, grad

    def step():
        model.zero_grad(set_to_none=True)
        if variant == "naive-xtok":
            logits = model(input_ids=input_ids).logits.reshape(n, -1).float()
            loss = (weight * cross_tokenizer_kd_loss(logits, rows, setting)).sum()
        else:
            hidden = body(input_ids=input_ids).last_hidden_state.reshape(n, -1)
            groups = None if chunks is None else chunks["alm_chunk"]
            loss = chunked_head_loss(hidden, head, kernel, chunk_size=chunk, groups=groups)
        loss.backward()
        return loss.detach().item()

    return step


def _make(args, model, vocab: int, variant: str):
    return make_step(variant, model, vocab, args.batch, args.seq, args.chunk, args.k)


def memory_child(args) -> None:
    torch.set_num_threads(args.threads)
    model = bench_step.build_model(args.vocab[0], args.seq)
    step = _make(args, model, args.vocab[0], args.variant)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = bench_step._rss_kib("VmRSS:")
    step()
    print(json.dumps({"peak_mib": (bench_step._rss_kib("VmHWM:") - before) / 1024}))


def measure_times(args, vocab: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of ``args.reps`` interleaved steps of each variant (after a warm-up)."""
    model = bench_step.build_model(vocab, args.seq)
    steps = {variant: _make(args, model, vocab, variant) for variant in args.variants}
    wall: dict[str, list[float]] = {variant: [] for variant in args.variants}
    cpu: dict[str, list[float]] = {variant: [] for variant in args.variants}
    for variant in args.variants:  # warm-up
        steps[variant]()
    for _ in range(args.reps):
        for variant in args.variants:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[variant]()
            wall[variant].append(time.perf_counter() - start)
            cpu[variant].append(time.process_time() - start_cpu)
    return wall, cpu


def measure_memory(args, vocab: int, variant: str) -> float:
    command = [sys.executable, __file__, "--child", "--variant", variant, "--vocab", str(vocab),
               "--batch", str(args.batch), "--seq", str(args.seq), "--k", str(args.k),
               "--chunk", str(args.chunk), "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="chunked-xtok", help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        help="which variants (chunked-ce always: the ratios' baseline)",
    )
    args = parser.parse_args()
    if args.child:
        memory_child(args)
        return
    if "chunked-ce" not in args.variants:
        args.variants = ["chunked-ce", *args.variants]
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch} x {args.seq}, k = {args.k}, chunk {args.chunk}, {args.threads} "
          f"threads, {args.reps} interleaved reps; step = forward + backward")  # fmt: skip
    for vocab in args.vocab:
        wall, cpu = measure_times(args, vocab)
        variants = args.variants
        memory = {} if args.skip_memory else {v: measure_memory(args, vocab, v) for v in variants}
        best = {v: min(wall[v]) for v in variants}
        cpu_med = {v: statistics.median(cpu[v]) for v in variants}
        print(f"\nvocab {vocab}")
        print(f"{'variant':<18}{'wall min s':>11}{'/ ch-ce':>9}{'cpu med s':>11}{'/ ch-ce':>9}"
              + ("" if not memory else f"{'peak MiB':>10}{'/ ch-ce':>9}"))  # fmt: skip
        for v in variants:
            line = f"{v:<18}{best[v]:>11.3f}{best[v] / best['chunked-ce']:>9.3f}"
            line += f"{cpu_med[v]:>11.3f}{cpu_med[v] / cpu_med['chunked-ce']:>9.3f}"
            if memory:
                line += f"{memory[v]:>10.0f}{memory[v] / memory['chunked-ce']:>9.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
