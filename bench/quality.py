"""The distillation-quality study (issue 7): does a sparse cache keep what full KD gives?

    python bench/quality.py --settings demo --out bench/quality-results &   # one core each,
    python bench/quality.py --settings sharp --out bench/quality-results &  # ~45 min per setting
    python bench/quality.py --quick --out /tmp/q                             # smoke run (seconds)

Settings: ``demo`` (the held-out demo split, teacher at temperature 1), ``sharp`` (the same data,
teacher at ``Study.sharp_temperature`` = 0.7: a sharper teacher), ``written`` (text the teacher
wrote itself at 0.5, scored at temperature 1; the previous study's "sharp"). The student has
untied embeddings unless ``--tied``.

One process, side by side, same student init, same data order and same steps for every
configuration of a (setting, seed):

* ``ce``: next-token cross-entropy alone (no teacher);
* ``online-{fkl,rkl,akl}``: the full teacher in the loop (full-vocabulary divergence, the ceiling);
* ``top8-*`` / ``top64-*``: top-k + tail bucket (``sparse_kd_loss``), log-probs fp16-rounded as
  the exact storage mode keeps them;
* ``tail-{fkl,akl}``: top-k' exact + s importance-sampled tail tokens (``topk_tail_kd_loss``),
  k' + s chosen so the measured bytes/token are <= top-64's;
* ``rskd-fkl``: RS-KD (``sampled_kd_loss``), N draws from the teacher, unique ids with counts;

each without and with a CE mix (``--ce-mix``). The sparse targets are computed from the dense
teacher in this process, exactly as ``kdcache build`` would store them (same top-k, same fp16
rounding; tail samples drawn per sequence from a seeded generator, fixed for the whole run like a
cache). Bytes/token are measured with the real shard encoder (``BlockCodec``, exact mode) on the
same records. Metrics on held-out sequences, every ``--eval-every`` steps, against the *full*
teacher: KL(teacher || student), next-token CE, top-1 agreement, and the AKL head / tail gaps.

Results go to ``<out>/results-<settings>.json`` after every run (a rerun skips finished runs), then
``bench/quality_report.py`` writes the tables and plots (``docs/QUALITY.md``, ``docs/img``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from quality_data import (  # bench/ is on sys.path when this file runs as a script
    Sparse,
    demo_blocks,
    measure_bytes,
    sparse_targets,
    teacher_targets,
    teacher_written_blocks,
)
from rskd import sampled_kd_loss  # bench/ is on sys.path when this file runs as a script
from torch.nn import functional as F

from kdcache.cache.extraction.heads import resolve_head
from kdcache.trainer.losses import akl_head_mask, dense_kd_loss, sparse_kd_loss
from kdcache.trainer.sampled import topk_tail_kd_loss

KINDS = ("fkl", "rkl", "akl")


@dataclass
class Study:
    """Every setting of one study run (stored in results.json)."""

    teacher: str
    seq_len: int = 32
    batch_size: int = 8
    steps: int = 200
    lr: float = 3e-3
    warmup: int = 10
    eval_every: int = 20
    eval_sequences: int = 32
    ce_mix: float = 0.2
    tail_topk: int = 24
    tail_samples: int = 16
    rskd_draws: int = 64
    mu: float = 0.5
    student_hidden: int = 64
    student_layers: int = 2
    student_tied: bool = False  # tied input/output embeddings (--tied; see docs/QUALITY.md)
    sharp_temperature: float = 0.7  # "sharp": the teacher's distribution at this temperature
    written_temperature: float = 0.5  # "written": text the teacher wrote at this temperature
    threads: int = 1  # one per process; run the two settings as two processes


# ----------------------------------------------------------------------------- student
def make_student(study: Study, vocab: int, seed: int):
    """A tiny Llama student seeded by ``seed``; the same init for every config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=study.student_hidden,
        intermediate_size=3 * study.student_hidden,
        num_hidden_layers=study.student_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=study.student_tied,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def run_loss(config: str, logits, labels, teacher_logits, sparse: Sparse, study: Study, alpha):
    """Mean training loss of one batch for a configuration name like ``top64-akl``."""
    if config == "ce":
        return F.cross_entropy(logits, labels)
    mode, kind = config.split("-")
    if mode == "online":
        kd = dense_kd_loss(logits, teacher_logits, kind=kind, mu=study.mu)
    elif mode in ("top8", "top64"):
        k = 8 if mode == "top8" else 64
        tail = sparse.tail8 if k == 8 else sparse.tail64
        ids, lp = sparse.top_ids[:, :k], sparse.top_lp[:, :k]
        kd = sparse_kd_loss(logits, ids, lp, tail, kind=kind, mu=study.mu)
    elif mode == "tail":
        k = study.tail_topk
        ids, lp = sparse.top_ids[:, :k], sparse.top_lp[:, :k]
        kd = topk_tail_kd_loss(
            logits, ids, lp, sparse.tailk, sparse.tail_ids, sparse.tail_lp, kind=kind, mu=study.mu
        )
    elif mode == "rskd":
        kd = sampled_kd_loss(logits, sparse.rs_ids, sparse.rs_counts, sparse.rs_lp)
    else:
        raise ValueError(config)
    loss = kd.mean()
    if alpha > 0:
        loss = (1 - alpha) * loss + alpha * F.cross_entropy(logits, labels)
    return loss


@torch.no_grad()
def heldout_reference(inputs, labels, teacher_logits, mu: float) -> dict:
    """The teacher's side of every evaluation, computed once: (N, V) log p, p, AKL head mask."""
    log_p = torch.log_softmax(teacher_logits.float(), -1)
    p = log_p.exp()
    return {
        "inputs": inputs,
        "labels": labels.reshape(-1),
        "log_p": log_p,
        "p": p,
        "head": akl_head_mask(p, torch.ones_like(p, dtype=torch.bool), mu),
        "argmax": teacher_logits.argmax(-1),
    }


@torch.no_grad()
def evaluate(student, reference: dict) -> dict:
    """Held-out metrics against the full teacher (positions = all of the held-out blocks)."""
    student.eval()
    log_p, p, head = reference["log_p"], reference["p"], reference["head"]
    logits = student(input_ids=reference["inputs"]).logits.float().reshape(-1, p.shape[1])
    student.train()
    log_q = torch.log_softmax(logits, -1)
    q = log_q.exp()
    gap = (p - q).abs()
    ce = float(F.cross_entropy(logits, reference["labels"]))
    return {
        "kl": float((p * (log_p - log_q)).sum(-1).mean()),
        "rkl": float((q * (log_q - log_p)).sum(-1).mean()),
        "ce": ce,
        "ppl": math.exp(ce),
        "top1": float((logits.argmax(-1) == reference["argmax"]).float().mean()),
        "head_gap": float((gap * head).sum(-1).mean()),
        "tail_gap": float((gap * ~head).sum(-1).mean()),
    }


# Run order (CPU is scarce; results are saved after every run, so the first tiers land first).
CORE = ("ce", "online-fkl", "online-akl", "top64-fkl", "top64-akl", "tail-fkl", "tail-akl",
        "rskd-fkl")  # fmt: skip
PAPER = ("online-rkl", "top64-rkl", "top8-akl", "top8-fkl")
MIX_FIRST = ("online-fkl", "top64-fkl", "top64-akl", "tail-fkl", "rskd-fkl")
MIX_REST = ("online-akl", "tail-akl", "online-rkl", "top64-rkl", "top8-akl", "top8-fkl",
            "top8-rkl")  # fmt: skip
REST = ("top8-rkl",)


def configurations(study: Study, seeds: list[int]) -> list[tuple[str, float, int]]:
    """(config name, CE mix, seed) triples of one setting, in run order: the core configs on every
    seed, the paper's RKL / top-8 runs, the most useful CE-mix runs, then everything else."""

    def alpha(name: str) -> float:
        return 1.0 if name == "ce" else 0.0

    order = [(name, alpha(name), seed) for seed in seeds for name in CORE]
    order += [(name, 0.0, seed) for seed in seeds for name in PAPER]
    order += [(name, study.ce_mix, seed) for seed in seeds for name in MIX_FIRST]
    order += [(name, study.ce_mix, seed) for seed in seeds for name in MIX_REST]
    order += [(name, 0.0, seed) for seed in seeds for name in REST]
    return order


# ----------------------------------------------------------------------------- runs
@torch.no_grad()
def prepare(setting: str, seed: int, teacher, head, tokenizer, study: Study) -> dict:
    """Data order, teacher hidden states and sparse targets of one (setting, seed)."""
    length = study.seq_len + 1
    blocks = demo_blocks(tokenizer, length)
    temperature = study.sharp_temperature if setting == "sharp" else 1.0
    if setting == "written":
        need = study.steps * study.batch_size + study.eval_sequences
        prompts = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(7))]
        prompts = prompts[: min(need, len(prompts))]
        blocks = teacher_written_blocks(teacher, prompts, length, study.written_temperature, 7)
    elif setting not in ("demo", "sharp"):
        raise SystemExit(f"unknown setting {setting!r}: use demo, sharp or written")
    heldout = blocks[-study.eval_sequences :]
    train_blocks = blocks[: -study.eval_sequences]
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    steps, hidden, sparse, nbytes = [], [], [], []
    entropy = []
    for step in range(study.steps):
        index = order[(torch.arange(study.batch_size) + step * study.batch_size) % len(order)]
        batch = train_blocks[index]
        h = teacher_targets(teacher, head, batch[:, :-1])
        logits = head.logits(h).reshape(-1, head.vocab_size) / temperature
        sparse.append(sparse_targets(logits, study, seed * 100_003 + step))
        if step < 4:
            nbytes.append(measure_bytes(batch[:, :-1], sparse[-1], study, head.vocab_size))
            log_p = torch.log_softmax(logits, -1)
            entropy.append(float(-(log_p.exp() * log_p).sum(-1).mean()))
        steps.append(batch)
        hidden.append(h.reshape(-1, h.shape[-1]))
    h_eval = teacher_targets(teacher, head, heldout[:, :-1])
    top64_mass = 1.0 - torch.cat([s.tail64 for s in sparse[:4]])
    return {
        "batches": steps,
        "hidden": hidden,
        "sparse": sparse,
        "temperature": temperature,
        "reference": heldout_reference(
            heldout[:, :-1],
            heldout[:, 1:],
            head.logits(h_eval).reshape(-1, head.vocab_size) / temperature,
            study.mu,
        ),
        "bytes_per_token": {key: float(np.mean([b[key] for b in nbytes])) for key in nbytes[0]},
        "teacher_entropy": float(np.mean(entropy)),
        "top64_mass_median": float(top64_mass.median()),
        "top8_mass_median": float((1.0 - torch.cat([s.tail8 for s in sparse[:4]])).median()),
        "train_sequences": len(train_blocks),
    }


def train_one(config: str, alpha: float, data: dict, init_state, head, study: Study, vocab: int):
    """Train one student; returns its eval curve [(step, metrics)] and wall time."""
    student = make_student(study, vocab, 0)
    student.load_state_dict(init_state)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=study.lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < study.warmup:
            return (step + 1) / study.warmup
        progress = (step - study.warmup) / max(1, study.steps - study.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    curve = [{"step": 0, **evaluate(student, data["reference"])}]
    started = time.perf_counter()
    for step in range(study.steps):
        batch = data["batches"][step]
        logits = student(input_ids=batch[:, :-1]).logits.reshape(-1, vocab)
        teacher_logits = None
        if config.startswith("online"):
            with torch.no_grad():
                teacher_logits = head.logits(data["hidden"][step]) / data["temperature"]
        labels = batch[:, 1:].reshape(-1)
        loss = run_loss(config, logits, labels, teacher_logits, data["sparse"][step], study, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % study.eval_every == 0 or step + 1 == study.steps:
            curve.append({"step": step + 1, **evaluate(student, data["reference"])})
    return curve, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="teacher dir (default: the demo teacher)")
    parser.add_argument("--out", type=Path, default=Path("bench/quality-results"))
    parser.add_argument("--settings", default="demo,sharp")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--tied", action="store_true", help="student with tied embeddings")
    parser.add_argument("--only", default=None, help="comma-separated config names to run")
    parser.add_argument("--alphas", default=None, help="comma-separated CE mixes to run (e.g. 0)")
    parser.add_argument("--quick", action="store_true", help="a few steps, a few configs")
    parser.add_argument("--tail-topk", type=int, default=None, help="top-k of the tail-* configs")
    parser.add_argument("--tail-samples", type=int, default=None, help="samples of tail-*")
    parser.add_argument("--rskd-draws", type=int, default=None, help="draws of rskd-fkl")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir = args.teacher
    if teacher_dir is None:
        from kdcache.demo import demo_teacher_dir

        teacher_dir = str(demo_teacher_dir())
    study = Study(teacher=teacher_dir)
    if args.steps:
        study.steps = args.steps
    if args.batch_size:
        study.batch_size = args.batch_size
    study.student_tied = args.tied
    for name in ("tail_topk", "tail_samples", "rskd_draws"):
        if getattr(args, name) is not None:
            setattr(study, name, getattr(args, name))
    if args.quick:
        study.steps, study.eval_every, study.eval_sequences = 6, 3, 4
    torch.set_num_threads(study.threads)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    head = resolve_head(teacher, torch.arange(8).unsqueeze(0))
    if head is None:
        raise SystemExit("this study needs a teacher whose lm_head splits from its body")
    vocab = head.vocab_size
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results-{args.settings.replace(',', '-')}.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}, "settings": {}}
    results["study"] = study.__dict__
    seeds = [int(s) for s in args.seeds.split(",")]
    order = configurations(study, seeds)
    if args.only:
        order = [item for item in order if item[0] in args.only.split(",")]
    if args.alphas:
        order = [item for item in order if item[1] in {float(a) for a in args.alphas.split(",")}]
    if args.quick:
        order = [("ce", 1.0, 0), ("online-akl", 0.0, 0), ("top8-fkl", 0.0, 0), ("tail-akl", 0.2, 0)]
    for setting in args.settings.split(","):
        prepared = {}
        for seed in sorted({seed for _, _, seed in order}):
            t0 = time.perf_counter()
            prepared[seed] = prepare(setting, seed, teacher, head, tokenizer, study)
            info = {
                k: v
                for k, v in prepared[seed].items()
                if k != "reference" and not isinstance(v, list | torch.Tensor)
            }
            results["settings"][setting] = info
            print(f"[{setting} seed {seed}] prepared in {time.perf_counter() - t0:.0f}s: {info}")
        for config, alpha, seed in order:
            key = f"{setting}/{seed}/{config}/{alpha:g}"
            if key in results["runs"]:
                continue
            init_state = make_student(study, vocab, seed).state_dict()
            curve, seconds = train_one(
                config, alpha, prepared[seed], init_state, head, study, vocab
            )
            results["runs"][key] = {"curve": curve, "seconds": seconds}
            final = curve[-1]
            print(
                f"{key:32s} KL {final['kl']:.4f} CE {final['ce']:.4f} top1 "
                f"{final['top1']:.3f} ({seconds:.0f}s)",
                flush=True,
            )
            path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
