"""KD training-step time and peak memory vs plain CE, per cache storage mode, side by side.

    python bench/bench_step.py                      # vocab 32k and 128k, batch 4 x 256, 2 threads
    python bench/bench_step.py --vocab 32000 --reps 3 --skip-memory

A step is forward + backward of a 2-layer Llama student (hidden 256, untied head) on one batch
through the real training objective (``DistillObjective``: body -> fused chunked head -> teacher
target; no optimizer, which is the same for every variant). AKL for the top-k modes, FKL for
``samples`` (its only loss). Variants:

    chunked-ce             the same objective with CE only (alpha 1): the baseline of the ratios
    hf-ce                  model(input_ids, labels=...).loss (Hugging Face, full logits)
    bucket-k64, bucket-k24                 topk_bucket cache, k = 64 / 24
    samples-k64-s16, samples-k24-s16       topk_samples cache (k24-s16: the build default)
    draws-s16, draws-s64                   samples cache (k = 0), 16 / 64 draws
    before-k24-s16         topk_samples k24 + 16 on the path training took before issue 14:
                           autograd per chunk through the reference loss (now only a fallback)
    q8-k8-s8, q8-s16       the issue-25 encoding: the teacher batch written and read back
                           through the ``q8`` shard codec (8-bit log-probs, samples with counts)

Times: --reps interleaved repetitions after one warm-up, all variants in this process; the
minimum wall time and the median process CPU time (on a shared, oversubscribed machine the CPU
time is the steadier estimate of the intrinsic cost). Memory: each variant's first step runs in
a fresh subprocess (glibc's mmap threshold at 64 KiB, so freed tensors leave the RSS); the peak
RSS (VmHWM) of the step minus the RSS just before it (model, batch and teacher already built).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from kdcache.trainer.objective import DistillObjective
from kdcache.trainer.sampled import draw_tail_samples
from kdcache.trainer.targets import (
    LossOptions,
    SamplesTarget,
    TeacherTarget,
    TopkBucketTarget,
    TopkSamplesTarget,
)

# variant -> (storage mode, k, tail samples); None: a CE variant
VARIANTS: dict[str, tuple[str, int, int] | None] = {
    "chunked-ce": None,
    "hf-ce": None,
    "bucket-k64": ("topk_bucket", 64, 0),
    "bucket-k24": ("topk_bucket", 24, 0),
    "samples-k64-s16": ("topk_samples", 64, 16),
    "samples-k24-s16": ("topk_samples", 24, 16),
    "draws-s16": ("samples", 0, 16),
    "draws-s64": ("samples", 0, 64),
    "before-k24-s16": ("topk_samples", 24, 16),
    "q8-k8-s8": ("topk_samples", 8, 8),
    "q8-s16": ("samples", 0, 16),
}
TARGETS = {
    "topk_bucket": TopkBucketTarget,
    "topk_samples": TopkSamplesTarget,
    "samples": SamplesTarget,
}


class _AutogradPerChunk(TopkSamplesTarget):
    """The pre-issue-14 training path of a topk+tail cache: autograd per chunk (base default)."""

    loss_and_grad = TeacherTarget.loss_and_grad


def build_model(vocab: int, seq: int, seed: int = 0):
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
    return LlamaForCausalLM(config)


@torch.no_grad()
def teacher_batch(vocab: int, batch: int, seq: int, k: int, samples: int, seed: int = 0) -> dict:
    """A collated batch (the targets' keys) from a peaked synthetic teacher, 256 rows at a time."""
    gen = torch.Generator().manual_seed(seed)
    n = batch * seq
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = input_ids.roll(-1, dims=1)
    labels[:, -1] = -100
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, 256):
        log_p = torch.log_softmax(4.0 * torch.randn(min(256, n - start), vocab, generator=gen), -1)
        logprobs, ids = log_p.topk(k, -1)
        columns = {"topk_ids": ids, "topk_logprobs": logprobs}
        columns["tail_mass"] = (1 - logprobs.exp().sum(-1)).clamp_min(0)
        if samples:
            tail_ids, tail_logprobs = draw_tail_samples(log_p, ids, samples, generator=gen)
            columns.update(tail_ids=tail_ids, tail_logprobs=tail_logprobs)
        for name, value in columns.items():
            parts.setdefault(name, []).append(value)
    out = {
        name: torch.cat(value).reshape(batch, seq, *value[0].shape[1:])
        for name, value in parts.items()
    }
    out.update(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        labels=labels,
        distill_mask=torch.ones(batch, seq, dtype=torch.bool),
    )
    return out


def through_codec(data: dict, encoding: str, k: int, samples: int, vocab: int) -> dict:
    """``data``'s teacher tensors as a shard of ``encoding`` returns them (one row per sequence)."""
    import numpy as np

    from kdcache.cache.format.distortion import round_trip
    from kdcache.cache.records import SequenceRecord

    names = ("topk_ids", "topk_logprobs", "tail_mass", "tail_ids", "tail_logprobs")
    records = []
    for row in range(data["input_ids"].shape[0]):
        arrays = {name: data[name][row].numpy() for name in names if name in data}
        seq = data["input_ids"].shape[1]
        if k == 0:  # a sampled cache stores no entries and tail mass 1
            arrays.update(topk_ids=np.zeros((seq, 0), np.int32),
                          topk_logprobs=np.zeros((seq, 0), np.float32),
                          tail_mass=np.ones(seq, np.float32))  # fmt: skip
        records.append(SequenceRecord(
            sequence_id=row, input_ids=data["input_ids"][row].numpy().astype(np.int32),
            positions=np.arange(seq, dtype=np.int32),
            **{name: value.astype(np.int32 if "ids" in name else np.float32)
               for name, value in arrays.items()},
        ))  # fmt: skip
    decoded = round_trip(records, encoding, k, vocab, samples)
    out = dict(data)
    for name in names:
        if name in data or (k == 0 and name in ("topk_ids", "topk_logprobs", "tail_mass")):
            stacked = np.stack([getattr(r, name) for r in decoded])
            out[name] = torch.from_numpy(stacked).to(
                torch.int64 if "ids" in name else torch.float32
            )
    return out


def make_step(variant: str, model, vocab: int, batch: int, seq: int, chunk: int):
    spec = VARIANTS[variant]
    if spec is None:
        data = teacher_batch(vocab, batch, seq, 0, 0)
        objective = DistillObjective(
            model, None, LossOptions(kind="fkl"), alpha=1.0, chunk_size=chunk, chunked=True
        )
    else:
        mode, k, samples = spec
        data = teacher_batch(vocab, batch, seq, k, samples)
        if variant.startswith("q8-"):
            data = through_codec(data, "q8", k, samples, vocab)
        target_class = _AutogradPerChunk if variant.startswith("before") else TARGETS[mode]
        manifest = {"top_k": k, "tail_samples": samples}
        kind = "fkl" if mode == "samples" else "akl"
        objective = DistillObjective(
            model, target_class(manifest), LossOptions(kind=kind), alpha=0.0, chunk_size=chunk,
            chunked=True,
        )  # fmt: skip
    count = float(batch * seq)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if variant == "hf-ce":
            loss = model(input_ids=data["input_ids"], labels=data["input_ids"]).loss
        else:
            loss = objective(data, count, count)
        loss.backward()
        return float(loss.detach())

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
    model = build_model(args.vocab[0], args.seq)
    step = make_step(args.variant, model, args.vocab[0], args.batch, args.seq, args.chunk)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the VmHWM high-water mark
    before = _rss_kib("VmRSS:")
    step()
    peak = _rss_kib("VmHWM:")
    print(json.dumps({"peak_mib": (peak - before) / 1024}))


def measure_memory(args, vocab: int, variant: str) -> float:
    command = [sys.executable, __file__, "--child", "--variant", variant, "--vocab", str(vocab)]
    command += ["--batch", str(args.batch), "--seq", str(args.seq), "--chunk", str(args.chunk)]
    command += ["--threads", str(args.threads)]
    # Every allocation >= 64 KiB is mmapped and returned to the OS when freed, so the RSS
    # high-water mark tracks live tensor memory instead of malloc's cached arenas.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def measure_times(args, vocab: int, variants: list[str]):
    model = build_model(vocab, args.seq)
    steps = {v: make_step(v, model, vocab, args.batch, args.seq, args.chunk) for v in variants}
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    cpu: dict[str, list[float]] = {variant: [] for variant in variants}
    losses = {variant: steps[variant]() for variant in variants}  # warm-up
    for _ in range(args.reps):
        for variant in variants:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[variant]()
            times[variant].append(time.perf_counter() - start)
            cpu[variant].append(time.process_time() - start_cpu)
    return times, cpu, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="bucket-k64", help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="peak memory, no timing")
    args = parser.parse_args()
    if args.child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    variants = ["chunked-ce", *(v for v in args.variants if v != "chunked-ce")]
    print(
        f"batch {args.batch} x {args.seq} positions, chunk {args.chunk}, {args.threads} threads, "
        f"{args.reps} interleaved reps; student Llama hidden 256, 2 layers, untied head; "
        "step = forward + backward of DistillObjective; ratios / chunked-ce"
    )
    for vocab in args.vocab:
        if args.memory_only:
            memory = {v: measure_memory(args, vocab, v) for v in variants}
            print(f"\nvocab {vocab}: peak MiB, ratio / chunked-ce")
            for v in variants:
                print(
                    f"{v:<17}{memory[v]:>10.0f}{memory[v] / memory['chunked-ce']:>7.3f}", flush=True
                )
            continue
        times, cpu, losses = measure_times(args, vocab, variants)
        memory = {} if args.skip_memory else {v: measure_memory(args, vocab, v) for v in variants}
        best = {v: min(times[v]) for v in variants}
        cpu_med = {v: statistics.median(cpu[v]) for v in variants}
        print(f"\nvocab {vocab}")
        header = (
            f"{'variant':<17}{'loss':>8}{'wall min s':>11}{'ratio':>7}{'cpu med s':>10}{'ratio':>7}"
        )
        print(header + ("" if not memory else f"{'peak MiB':>10}{'ratio':>7}"))
        for v in variants:
            line = f"{v:<17}{losses[v]:>8.3f}{best[v]:>11.3f}{best[v] / best['chunked-ce']:>7.3f}"
            line += f"{cpu_med[v]:>10.3f}{cpu_med[v] / cpu_med['chunked-ce']:>7.3f}"
            if memory:
                line += f"{memory[v]:>10.0f}{memory[v] / memory['chunked-ce']:>7.3f}"
            print(line, flush=True)
        assert all(math.isfinite(value) for value in losses.values())


if __name__ == "__main__":
    main()
