"""KD training-step time and peak memory vs plain CE, side by side, on a tiny student body.

    python bench/bench_step.py                    # vocab 32k and 128k, batch 4 x 256, 2 threads
    python bench/bench_step.py --vocab 32000 --reps 3

A step is forward + backward of a 2-layer Llama student (hidden 256) on one batch (no optimizer:
the optimizer is the same for every variant and would only dilute the ratios). Variants:

    hf-ce       model(input_ids, labels=...).loss   (Hugging Face, full logits)
    chunked-ce  body -> chunked_distill_loss(CE only)              (kdcache, fused chunks)
    chunked-kd  body -> chunked_distill_loss(sparse AKL, k = 64)   (kdcache, fused chunks)
    ckpt-kd     the same with torch.utils.checkpoint per chunk
    naive-kd    model(input_ids).logits -> sparse_kd_loss          (full logits)

Times: --reps interleaved repetitions after one warm-up, all variants in this process; the
minimum wall time and the median process CPU time (on a shared, oversubscribed machine the CPU
time is the steadier estimate of the intrinsic cost).
Memory: each variant's first step runs in a fresh subprocess (with glibc's mmap threshold at
64 KiB, so freed tensors leave the RSS); the peak RSS (VmHWM) of the step minus the RSS just
before it (model, batch and teacher top-k already built).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from kdcache.cache.heads import OutputHead, body_of, split_head
from kdcache.trainer.chunked import chunked_distill_loss
from kdcache.trainer.losses import sparse_kd_loss

VARIANTS = ("hf-ce", "chunked-ce", "chunked-kd", "ckpt-kd", "naive-kd")


def build(vocab: int, batch: int, seq: int, k: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    input_ids = torch.randint(0, vocab, (batch, seq))
    labels = input_ids.roll(-1, dims=1)
    labels[:, -1] = -100
    n = batch * seq
    topk_logprobs, topk_ids = torch.empty(n, k), torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, 256):  # a peaked synthetic teacher, top-k taken chunk by chunk
        teacher = 4.0 * torch.randn(min(256, n - start), vocab)
        values, ids = torch.log_softmax(teacher, -1).topk(k, -1)
        topk_logprobs[start : start + 256], topk_ids[start : start + 256] = values, ids
    tail_mass = (1 - topk_logprobs.exp().sum(-1)).clamp_min(0)
    return model, input_ids, labels, topk_ids, topk_logprobs, tail_mass


def make_step(variant, model, input_ids, labels, topk_ids, topk_logprobs, tail_mass, chunk):
    head: OutputHead = split_head(model)
    body = body_of(model)
    flat_labels = labels.reshape(-1)
    n = flat_labels.shape[0]
    weight = torch.full((n,), 1.0 / n)

    def step():
        model.zero_grad(set_to_none=True)
        if variant == "hf-ce":
            loss = model(input_ids=input_ids, labels=input_ids).loss
        elif variant == "naive-kd":
            logits = model(input_ids=input_ids).logits.reshape(n, -1)
            loss = sparse_kd_loss(logits, topk_ids, topk_logprobs, tail_mass, reduction="mean")
        else:
            hidden = body(input_ids=input_ids).last_hidden_state.reshape(n, -1)
            if variant == "chunked-ce":
                loss = chunked_distill_loss(
                    hidden, head, None, None, None, flat_labels, None, weight, chunk_size=chunk
                )
            else:
                method = "checkpoint" if variant == "ckpt-kd" else "fused"
                loss = chunked_distill_loss(
                    hidden,
                    head,
                    topk_ids,
                    topk_logprobs,
                    tail_mass,
                    None,
                    weight,
                    None,
                    kind="akl",
                    chunk_size=chunk,
                    method=method,
                )
        loss.backward()
        return loss.detach().item()

    return step


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(args) -> None:
    """Runs in a fresh process: peak RSS increase of one step of ``args.variant``."""
    torch.set_num_threads(args.threads)
    built = build(args.vocab[0], args.batch, args.seq, args.k)
    step = make_step(args.variant, *built, chunk=args.chunk)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the VmHWM high-water mark
    before = _rss_kib("VmRSS:")
    step()
    peak = _rss_kib("VmHWM:")
    print(json.dumps({"peak_mib": (peak - before) / 1024}))


def measure_memory(args, vocab: int, variant: str) -> float:
    command = [sys.executable, __file__, "--child", "--variant", variant, "--vocab", str(vocab)]
    command += ["--batch", str(args.batch), "--seq", str(args.seq), "--k", str(args.k)]
    command += ["--chunk", str(args.chunk), "--threads", str(args.threads)]
    # Every allocation >= 64 KiB is mmapped and returned to the OS when freed, so the RSS
    # high-water mark tracks live tensor memory instead of malloc's cached arenas.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def measure_times(args, vocab: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    built = build(vocab, args.batch, args.seq, args.k)
    steps = {variant: make_step(variant, *built, chunk=args.chunk) for variant in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for variant in VARIANTS:  # warm-up
        steps[variant]()
    for _ in range(args.reps):
        for variant in VARIANTS:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[variant]()
            times[variant].append(time.perf_counter() - start)
            cpu[variant].append(time.process_time() - start_cpu)
    return times, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="chunked-kd", help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    if args.child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    print(
        f"batch {args.batch} x {args.seq} positions, k = {args.k}, chunk {args.chunk}, "
        f"{args.threads} threads, {args.reps} interleaved reps; student Llama "
        "hidden 256, 2 layers, untied head; step = forward + backward"
    )
    for vocab in args.vocab:
        if args.memory_only:
            print(f"\nvocab {vocab}: peak MiB (/ chunked-ce)")
            memory = {v: measure_memory(args, vocab, v) for v in VARIANTS}
            for v in VARIANTS:
                print(f"{v:<12}{memory[v]:>10.0f}{memory[v] / memory['chunked-ce']:>9.3f}")
            continue
        times, cpu = measure_times(args, vocab)
        memory = {} if args.skip_memory else {v: measure_memory(args, vocab, v) for v in VARIANTS}
        best = {v: min(times[v]) for v in VARIANTS}
        cpu_med = {v: statistics.median(cpu[v]) for v in VARIANTS}
        print(f"\nvocab {vocab}")
        header = f"{'variant':<12}{'wall min s':>11}{'/ ch-ce':>9}{'/ hf-ce':>9}"
        header += f"{'cpu med s':>11}{'/ ch-ce':>9}{'/ hf-ce':>9}"
        print(header + ("" if args.skip_memory else f"{'peak MiB':>10}{'/ ch-ce':>9}"))
        for v in VARIANTS:
            line = f"{v:<12}{best[v]:>11.3f}{best[v] / best['chunked-ce']:>9.3f}"
            line += f"{best[v] / best['hf-ce']:>9.3f}{cpu_med[v]:>11.3f}"
            line += (
                f"{cpu_med[v] / cpu_med['chunked-ce']:>9.3f}{cpu_med[v] / cpu_med['hf-ce']:>9.3f}"
            )
            if memory:
                line += f"{memory[v]:>10.0f}{memory[v] / memory['chunked-ce']:>9.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
