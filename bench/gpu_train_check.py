"""Training step of a ~0.5B student at vocab 152k: the plain step vs each GPU flag, side by side.

    python bench/gpu_train_check.py                 # CUDA: Qwen2-0.5B-shaped student (bench/gpu_check.sh)
    python bench/gpu_train_check.py --dry-run       # the same code on the CPU at tiny sizes

A student built from config (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab
151936, untied head: ~0.63B parameters) takes full optimizer steps (bf16 autocast, AdamW fused on
CUDA) through the trainer's own pieces (``wrap_model``, ``DistillObjective`` on a top-64 +
bucket batch, ``build_optimizer``). Variants, each a fresh model:

* ``fp32-head``: the chunked head's GEMMs in float32 (the head before this change);
* ``bf16-head``: the head in the compute dtype (bf16 operands, fp32 accumulation): the default;
* ``bf16-head+ckpt``: plus ``--gradient-checkpointing``;
* ``bf16-head+compile``: plus ``--compile`` (skipped in ``--dry-run``: inductor's CPU build
  takes minutes).

For each: tokens/s (best of ``--reps`` timed steps after ``--warmup``), peak memory
(``torch.cuda.max_memory_allocated`` over a step, parameters and optimizer state included; n/a
on the CPU) and, for the two head dtypes, the head's share of the step (the chunked head's
forward + backward alone, on the same (N, H) hidden states, over the whole step's time). Each
result is also printed as a ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import numpy as np
import torch

QWEN_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
TINY = dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=2048)
VARIANTS = ("fp32-head", "bf16-head", "bf16-head+ckpt", "bf16-head+compile")
TOP_K = 64


def synthetic_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> list:
    """``batch`` SequenceRecords with a top-64 + bucket teacher, made in O(seq x k) (no V-wide
    logits): distinct ids per row, a peaked descending distribution holding 90% of the mass."""
    from kdcache.cache.records import SequenceRecord

    rng = np.random.default_rng(seed)
    records = []
    for index in range(batch):
        start = rng.integers(0, vocab, (seq, 1))
        ids = (start + np.arange(TOP_K) * 7919) % vocab  # distinct: 7919 is prime, vocab > k
        weights = np.sort(rng.exponential(1.0, (seq, TOP_K)) ** 3, axis=1)[:, ::-1]
        probs = 0.9 * weights / weights.sum(1, keepdims=True)
        records.append(SequenceRecord(
            sequence_id=index, input_ids=rng.integers(0, vocab, seq).astype(np.int32),
            topk_ids=ids.astype(np.int32), topk_logprobs=np.log(probs).astype(np.float32),
            tail_mass=np.full(seq, 0.1, np.float32), positions=np.arange(seq, dtype=np.int32),
        ))  # fmt: skip
    return records


def build_student(sizes: dict, seq: int, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
        intermediate_size=sizes["intermediate"], num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"], num_key_value_heads=sizes["kv_heads"],
        max_position_embeddings=max(seq, 128), tie_word_embeddings=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device(device):  # initialised on the device: seconds, not minutes, at 0.6B
        return Qwen2ForCausalLM(config).train()


class Step:
    """One variant: its model, optimizer and a closure for one full optimizer step."""

    def __init__(self, args, sizes: dict, variant: str, batch: dict) -> None:
        from kdcache.trainer.config import TrainConfig
        from kdcache.trainer.model_wrapping import WrapSettings, wrap_model
        from kdcache.trainer.objective import DistillObjective, with_position_rows
        from kdcache.trainer.optim import build_optimizer
        from kdcache.trainer.targets import LossOptions, TopkBucketTarget

        device = torch.device(args.device)
        self.device, self.variant = device, variant
        self.model = build_student(sizes, args.seq, args.device)
        settings = WrapSettings(gradient_checkpointing="ckpt" in variant,
                                compile="compile" in variant)  # fmt: skip
        wrap_model(self.model, settings, device)
        head_dtype = torch.float32 if variant == "fp32-head" else torch.bfloat16
        self.objective = DistillObjective(
            self.model, TopkBucketTarget({"top_k": TOP_K}), LossOptions(kind="akl"), alpha=0.0,
            chunk_size=args.chunk, chunked=True, compute_dtype=head_dtype,
        )  # fmt: skip
        config = TrainConfig(cache="-", student="-", out="-", lr=1e-4)
        self.optimizer = build_optimizer(self.model, config)
        batch = with_position_rows(batch, 0.0)
        self.batch = {key: value.to(device) for key, value in batch.items()}
        self.count = float(batch["distill_mask"].sum())

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.objective(self.batch, self.count, self.count)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def head_seconds(self, reps: int) -> float:
        """Best time of the chunked head's forward + backward alone on this step's positions."""
        from kdcache.cache.extraction.heads import split_head
        from kdcache.trainer.chunked import chunked_head_loss
        from kdcache.trainer.objective import loss_kernel
        from kdcache.trainer.targets import LossOptions

        objective, batch = self.objective, self.batch
        rows = batch["rows"]
        hidden_size = self.model.config.hidden_size
        hidden = torch.randn(rows.numel(), hidden_size, device=self.device).requires_grad_()
        weight = torch.full((rows.numel(),), 1.0 / rows.numel(), device=self.device)
        teacher = objective.target.select(batch, rows, objective.vocab_size)
        kernel = loss_kernel(objective.target, teacher, LossOptions(kind="akl"), weight, None, None)
        head = split_head(self.model)

        def run() -> None:
            loss = chunked_head_loss(hidden, head, kernel, chunk_size=objective.chunk_size,
                                     compute_dtype=objective.compute_dtype)  # fmt: skip
            loss.backward()

        return best_seconds(run, self.device, 1, reps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(function, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        function()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        function()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(args, sizes: dict, variant: str, batch: dict) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = Step(args, sizes, variant, batch)
    seconds = best_seconds(step, device, args.warmup, args.reps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    head = step.head_seconds(args.reps) if variant in ("fp32-head", "bf16-head") else None
    tokens = args.batch * args.seq
    row = {
        "bench": "train", "variant": variant, "vocab": sizes["vocab"],
        "parameters": sum(p.numel() for p in step.model.parameters()),
        "tokens_per_s": tokens / seconds, "step_s": seconds, "peak_gib": peak,
        "head_s": head, "head_share": None if head is None else head / seconds,
    }  # fmt: skip
    del step
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    sizes = TINY if args.dry_run else QWEN_05B
    if args.dry_run:
        args.device = args.device or "cpu"
        args.batch, args.seq, args.chunk, args.warmup, args.reps = 1, 64, 32, 1, 1
        args.variants = [v for v in args.variants if "compile" not in v]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    records = synthetic_batch(sizes["vocab"], args.batch, args.seq)
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.targets import TopkBucketTarget

    batch = collate_records(records, TopkBucketTarget({"top_k": TOP_K}))
    print(f"student qwen2 hidden {sizes['hidden']}, {sizes['layers']} layers, vocab "
          f"{sizes['vocab']}, batch {args.batch} x {args.seq}, chunk {args.chunk}, "
          f"{args.device}, bf16 autocast; best of {args.reps} steps", flush=True)  # fmt: skip
    rows = []
    for variant in args.variants:
        try:
            row = measure(args, sizes, variant, batch)
        except Exception as error:  # one variant failing (e.g. out of memory) is a result too
            first = (str(error).strip() or type(error).__name__).splitlines()[0][:160]
            print(f"{variant}: failed ({first})", flush=True)
            continue
        rows.append(row)
        peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"
        share = "" if row["head_share"] is None else f", head {row['head_share']:.0%} of step"
        print(f"{variant}: {row['tokens_per_s']:,.0f} tokens/s, peak {peak}{share} "
              f"({row['parameters'] / 1e9:.2f}B parameters)", flush=True)  # fmt: skip
    base = next((row for row in rows if row["variant"] == "fp32-head"), None)
    for row in rows:
        row["speed_vs_fp32_head"] = (
            None if base is None else row["tokens_per_s"] / base["tokens_per_s"]
        )
        print("RESULT " + json.dumps(row), flush=True)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
