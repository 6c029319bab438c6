"""What the training flags cost and change, measured where no GPU is needed.

    python bench/bench_train_flags.py --threads 1

1. Head numerics: the chunked head with bf16 GEMM operands (``compute_dtype=torch.bfloat16``)
   and with fp32 ones, against the fp32 dense reference (full logits + autograd), per cache mode:
   relative error of the loss, and of each gradient (max |error| / max |reference|).
2. Gradient checkpointing on a small Llama student (``--hidden``, ``--layers``, ``--seq``): the
   elements autograd keeps for backward (``saved_tensors_hooks``), and the step time, with over
   without (interleaved repetitions, min of each). On a GPU the memory ratio carries over; the
   time ratio is the GPU's own (bench/gpu_train_check.py measures it there).

Each result is also printed as a ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch.nn import functional as F


def head_errors(n: int, hidden: int, vocab: int, seed: int = 0) -> list[dict]:
    """Per cache mode: relative loss / gradient errors of the bf16 and fp32 heads."""
    from kdcache.cache.extraction.heads import OutputHead
    from kdcache.trainer.chunked import chunked_head_loss
    from kdcache.trainer.losses import dense_kd_loss, sparse_kd_loss
    from kdcache.trainer.objective import loss_kernel
    from kdcache.trainer.sampled import topk_tail_kd_loss
    from kdcache.trainer.targets import (
        DenseTeacherTarget,
        LossOptions,
        TopkBucketTarget,
        TopkSamplesTarget,
    )
    from kdcache.trainer.targets.samples import SamplesTarget, samples_fkl

    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(n, hidden, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_()
    head = OutputHead(weight, None)
    teacher = torch.log_softmax(4 * torch.randn(n, vocab, generator=gen), -1)
    top_lp, top_ids = teacher.topk(32, -1)
    tail = (1 - top_lp.exp().sum(-1)).clamp_min(0)
    outside = teacher.scatter(1, top_ids, -float("inf"))
    tail_ids = torch.multinomial(outside.exp(), 16, replacement=True, generator=gen)
    draws = torch.multinomial(teacher.exp(), 16, replacement=True, generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    kd_w = torch.full((n,), 0.9 / n)
    ce_w = torch.full((n,), 0.1 / n)
    samples = {"tail_ids": draws, "tail_logprobs": teacher.gather(1, draws)}
    modes = {
        "topk-bucket": (TopkBucketTarget(), {"topk_ids": top_ids, "topk_logprobs": top_lp,
                        "tail_mass": tail}, "akl",
                        lambda z: sparse_kd_loss(z, top_ids, top_lp, tail, kind="akl")),
        "topk-samples": (TopkSamplesTarget(), {"topk_ids": top_ids, "topk_logprobs": top_lp,
                         "tail_mass": tail, "tail_ids": tail_ids,
                         "tail_logprobs": teacher.gather(1, tail_ids)}, "akl",
                         lambda z: topk_tail_kd_loss(z, top_ids, top_lp, tail, tail_ids,
                                                     teacher.gather(1, tail_ids), kind="akl")),
        "samples": (SamplesTarget(), samples, "fkl",
                    lambda z: samples_fkl(z, samples, LossOptions(kind="fkl"))),
        "dense": (DenseTeacherTarget(None, None, vocab), {"teacher_states": teacher}, "akl",
                  lambda z: dense_kd_loss(z, teacher, kind="akl")),
    }  # fmt: skip
    rows = []
    for mode, (target, teacher_rows, kind, kd) in modes.items():
        kernel = loss_kernel(target, teacher_rows, LossOptions(kind=kind), kd_w, labels, ce_w)
        logits = F.linear(states, weight)
        ce = F.cross_entropy(logits, labels, reduction="none")
        reference = (kd_w * kd(logits) + ce_w * ce).sum()
        ref_grads = torch.autograd.grad(reference, [states, weight])
        row = {"bench": "head_numerics", "mode": mode, "n": n, "hidden": hidden, "vocab": vocab}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            loss = chunked_head_loss(states, head, kernel, chunk_size=128, compute_dtype=dtype)
            grads = torch.autograd.grad(loss, [states, weight])
            row[f"{name}_loss_rel"] = float(((loss - reference).abs() / reference.abs()).detach())
            for label, got, want in zip(("hidden", "weight"), grads, ref_grads, strict=True):
                error = (got - want).abs().max() / want.abs().max()
                row[f"{name}_grad_{label}_rel"] = float(error)
        rows.append(row)
    return rows


def checkpointing(hidden: int, layers: int, seq: int, batch: int, reps: int) -> dict:
    """Saved-for-backward elements and step time of a Llama student, checkpointed / plain."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcache.trainer.model_wrapping import WrapSettings, wrap_model
    from kdcache.trainer.objective import DistillObjective
    from kdcache.trainer.targets import LossOptions

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False,
                         max_position_embeddings=seq)  # fmt: skip
    plain = LlamaForCausalLM(config).train()
    checkpointed = wrap_model(copy.deepcopy(plain), WrapSettings(gradient_checkpointing=True),
                              torch.device("cpu"))  # fmt: skip
    ids = torch.randint(0, 4096, (batch, seq))
    labels = torch.roll(ids, -1, 1)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "distill_mask": torch.ones_like(ids, dtype=torch.bool)}  # fmt: skip
    count = float(ids.numel())

    def objective(model):
        return DistillObjective(model, None, LossOptions(kind="fkl"), alpha=1.0,
                                chunk_size=512, chunked=True)  # fmt: skip

    objectives = {"plain": objective(plain), "checkpointed": objective(checkpointed)}

    def saved(name: str) -> int:
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = objectives[name](data, count, count)
        loss.backward()
        return sum(sizes)

    saved_bytes = {name: saved(name) for name in objectives}
    times = {name: [] for name in objectives}
    for _ in range(reps):
        for name, step in objectives.items():
            start = time.perf_counter()
            step(data, count, count).backward()
            times[name].append(time.perf_counter() - start)
    return {
        "bench": "checkpointing", "hidden": hidden, "layers": layers, "tokens": batch * seq,
        "saved_mib_plain": saved_bytes["plain"] / 2**20,
        "saved_mib_checkpointed": saved_bytes["checkpointed"] / 2**20,
        "memory_ratio": saved_bytes["checkpointed"] / saved_bytes["plain"],
        "time_ratio": min(times["checkpointed"]) / min(times["plain"]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="positions of the head problem")
    parser.add_argument("--head-hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"head numerics: N {args.n}, H {args.head_hidden}, V {args.vocab}; error relative to "
          "the fp32 dense reference (loss; max |grad error| / max |grad|)", flush=True)  # fmt: skip
    for row in head_errors(args.n, args.head_hidden, args.vocab):
        print(f"  {row['mode']:<13} bf16 loss {row['bf16_loss_rel']:.1e}, grad hidden "
              f"{row['bf16_grad_hidden_rel']:.1e}, grad W {row['bf16_grad_weight_rel']:.1e} | "
              f"fp32 loss {row['fp32_loss_rel']:.1e}, grad hidden "
              f"{row['fp32_grad_hidden_rel']:.1e}, grad W {row['fp32_grad_weight_rel']:.1e}",
              flush=True)  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)
    row = checkpointing(args.hidden, args.layers, args.seq, args.batch, args.reps)
    print(f"gradient checkpointing, llama hidden {args.hidden} x {args.layers} layers, "
          f"{row['tokens']} tokens: saved for backward {row['saved_mib_checkpointed']:.1f} vs "
          f"{row['saved_mib_plain']:.1f} MiB (x{row['memory_ratio']:.2f}), step time "
          f"x{row['time_ratio']:.2f}", flush=True)  # fmt: skip
    print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
