"""The distillation-quality study (issue 7): does a sparse cache keep what full KD gives?

    python bench/quality.py --out bench/quality-results        # the whole study (~40 min, 2 cores)
    python bench/quality.py --quick --out /tmp/q                # smoke run (seconds)

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
from torch.nn import functional as F

from kdcache.cache.format import BlockCodec
from kdcache.cache.heads import body_of, resolve_head
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.losses import akl_head_mask, dense_kd_loss, sparse_kd_loss
from kdcache.trainer.sampled import draw_samples, sampled_kd_loss, topk_tail_kd_loss

KINDS = ("fkl", "rkl", "akl")


@dataclass
class Study:
    """Every setting of one study run (stored in results.json)."""

    teacher: str
    seq_len: int = 32
    batch_size: int = 4
    steps: int = 80
    lr: float = 3e-3
    warmup: int = 8
    eval_every: int = 10
    eval_sequences: int = 24
    ce_mix: float = 0.2
    tail_topk: int = 24
    tail_samples: int = 16
    rskd_draws: int = 36
    mu: float = 0.5
    student_hidden: int = 64
    student_layers: int = 2
    sharp_temperature: float = 0.5  # sampling temperature of the teacher-written sharp dataset
    threads: int = 1  # one per process; run the two settings as two processes


# ----------------------------------------------------------------------------- data
def demo_blocks(tokenizer, length: int) -> torch.Tensor:
    """The held-out demo split (stdlib files the teacher never saw) as (N, length) token blocks."""
    from kdcache.demo import corpus

    ids: list[int] = []
    for enc in tokenizer(corpus.iter_texts("demo"), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


@torch.no_grad()
def teacher_written_blocks(teacher, prompts: torch.Tensor, length: int, temperature: float, seed):
    """Text the teacher writes itself at ``temperature`` < 1 from 8-token demo prompts.

    A lower-entropy dataset for the same teacher (its own likely continuations): the sharper
    setting. Returns (N, length) blocks.
    """
    torch.manual_seed(seed)
    blocks = []
    for start in range(0, len(prompts), 256):
        out = teacher.generate(
            input_ids=prompts[start : start + 256, :8],
            attention_mask=torch.ones_like(prompts[start : start + 256, :8]),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=length - 8,
            min_new_tokens=length - 8,
            pad_token_id=teacher.config.pad_token_id,
        )
        blocks.append(out[:, :length])
    return torch.cat(blocks)


@torch.no_grad()
def teacher_targets(teacher, head, inputs: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, H) of the teacher: logits = head.logits(hidden), exactly."""
    return body_of(teacher)(input_ids=inputs).last_hidden_state


@dataclass
class Sparse:
    """The sparse targets of one batch, as a cache would hold them (rows = B * T positions)."""

    top_ids: torch.Tensor  # (N, 64)
    top_lp: torch.Tensor  # (N, 64) fp16-rounded
    tail64: torch.Tensor  # (N,)
    tail8: torch.Tensor  # (N,)
    tailk: torch.Tensor  # (N,) tail mass outside the top-k' of the tail mode
    tail_ids: torch.Tensor  # (N, s)
    tail_lp: torch.Tensor  # (N, s) fp16-rounded
    rs_ids: torch.Tensor  # (N, u)
    rs_counts: torch.Tensor  # (N, u)
    rs_lp: torch.Tensor  # (N, u) fp16-rounded


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


@torch.no_grad()
def sparse_targets(teacher_logits: torch.Tensor, study: Study, seed: int) -> Sparse:
    """Top-64 / top-8 / top-k' + tail samples / RS-KD draws of (N, V) teacher logits."""
    log_p = torch.log_softmax(teacher_logits.float(), -1)  # (N, V)
    top_lp, top_ids = log_p.topk(64, dim=-1)
    probs = top_lp.exp()
    total = log_p.exp().sum(-1)  # 1 up to rounding

    def tail_after(k: int) -> torch.Tensor:
        return (total - probs[:, :k].sum(-1)).clamp_min(0.0)

    k = study.tail_topk
    generator = torch.Generator().manual_seed(seed)
    outside = log_p.scatter(1, top_ids[:, :k], -math.inf).exp()  # (N, V) tail p_j
    tail_ids = torch.multinomial(outside, study.tail_samples, replacement=True, generator=generator)
    rs_ids, rs_counts, rs_lp, _ = draw_samples(log_p, study.rskd_draws, generator=generator)
    return Sparse(
        top_ids=top_ids,
        top_lp=_rounded(top_lp),
        tail64=tail_after(64),
        tail8=tail_after(8),
        tailk=tail_after(k),
        tail_ids=tail_ids,
        tail_lp=_rounded(log_p.gather(1, tail_ids)),
        rs_ids=rs_ids,
        rs_counts=rs_counts,
        rs_lp=_rounded(rs_lp),
    )


def bytes_per_token(inputs: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, tail, vocab: int):
    """Exact-mode shard bytes/token of (B*T, w) rows, measured with the real block encoder."""
    batch, length = inputs.shape
    width = ids.shape[1]
    records = [
        SequenceRecord(
            sequence_id=b,
            input_ids=inputs[b].numpy().astype(np.int32),
            topk_ids=ids.view(batch, length, width)[b].numpy().astype(np.int32),
            topk_logprobs=lp.view(batch, length, width)[b].numpy().astype(np.float32),
            tail_mass=tail.view(batch, length)[b].numpy().astype(np.float32),
            positions=np.arange(length, dtype=np.int32),
        )
        for b in range(batch)
    ]
    encoded = BlockCodec("exact", top_k=width, vocab_size=vocab).encode(records)
    return encoded.nbytes / inputs.numel()


def measure_bytes(inputs: torch.Tensor, sparse: Sparse, study: Study, vocab: int) -> dict:
    """Bytes/token of each stored mode on one batch of sequences (same encoder for all)."""
    k = study.tail_topk
    ids = torch.cat([sparse.top_ids[:, :k], sparse.tail_ids], 1)
    lp = torch.cat([sparse.top_lp[:, :k], sparse.tail_lp], 1)
    rs_lp = torch.where(sparse.rs_counts > 0, sparse.rs_lp, -math.inf)
    rs = bytes_per_token(inputs, sparse.rs_ids, rs_lp, sparse.tail64, vocab)
    rs += sparse.rs_counts.numel() / inputs.numel() * 0.25  # uint8 counts, zstd ~4x (estimate)
    return {
        "top8": bytes_per_token(
            inputs, sparse.top_ids[:, :8], sparse.top_lp[:, :8], sparse.tail8, vocab
        ),
        "top64": bytes_per_token(inputs, sparse.top_ids, sparse.top_lp, sparse.tail64, vocab),
        "tail": bytes_per_token(inputs, ids, lp, sparse.tailk, vocab),
        "rskd": rs,
    }


# ----------------------------------------------------------------------------- student
def make_student(study: Study, vocab: int, seed: int):
    """A tiny Llama student (tied embeddings) seeded by ``seed``; same init for every config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=study.student_hidden,
        intermediate_size=3 * study.student_hidden,
        num_hidden_layers=study.student_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
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
def evaluate(student, heldout_inputs, heldout_labels, heldout_teacher_logits, mu: float) -> dict:
    """Held-out metrics against the full teacher (positions = all of the held-out blocks)."""
    student.eval()
    logits = (
        student(input_ids=heldout_inputs)
        .logits.float()
        .reshape(-1, heldout_teacher_logits.shape[1])
    )
    student.train()
    log_q = torch.log_softmax(logits, -1)
    log_p = torch.log_softmax(heldout_teacher_logits, -1)
    p, q = log_p.exp(), log_q.exp()
    labels = heldout_labels.reshape(-1)
    head = akl_head_mask(p, torch.ones_like(p, dtype=torch.bool), mu)
    gap = (p - q).abs()
    ce = float(F.cross_entropy(logits, labels))
    return {
        "kl": float((p * (log_p - log_q)).sum(-1).mean()),
        "rkl": float((q * (log_q - log_p)).sum(-1).mean()),
        "ce": ce,
        "ppl": math.exp(ce),
        "top1": float((logits.argmax(-1) == heldout_teacher_logits.argmax(-1)).float().mean()),
        "head_gap": float((gap * head).sum(-1).mean()),
        "tail_gap": float((gap * ~head).sum(-1).mean()),
    }


# Run order (CPU is scarce; results are saved after every run, so the first tiers land first).
CORE = ("ce", "online-fkl", "online-akl", "top64-fkl", "top64-akl", "tail-akl")
TIER_1 = (*CORE, "online-rkl", "top64-rkl", "top8-akl")
TIER_MIX = ("online-akl", "top64-akl", "tail-akl", "online-fkl", "top64-fkl", "tail-fkl")
TIER_REST = ("tail-fkl", "top8-fkl", "top8-rkl", "rskd-fkl")


def configurations(study: Study, seeds: list[int]) -> list[tuple[str, float, int]]:
    """(config name, CE mix, seed) triples of one setting, in run order: the first seed's tier 1,
    the core configs on the other seeds, the CE-mix runs, then everything else."""
    first, others = seeds[0], seeds[1:]

    def alpha(name: str) -> float:
        return 1.0 if name == "ce" else 0.0

    order = [(name, alpha(name), first) for name in TIER_1]
    order += [(name, alpha(name), seed) for seed in others for name in CORE]
    order += [(name, study.ce_mix, seed) for seed in seeds for name in TIER_MIX]
    order += [(name, 0.0, seed) for seed in others for name in TIER_1 if name not in CORE]
    order += [(name, 0.0, seed) for seed in seeds for name in TIER_REST]
    return order


# ----------------------------------------------------------------------------- runs
@torch.no_grad()
def prepare(setting: str, seed: int, teacher, head, tokenizer, study: Study) -> dict:
    """Data order, teacher hidden states and sparse targets of one (setting, seed)."""
    length = study.seq_len + 1
    blocks = demo_blocks(tokenizer, length)
    if setting == "sharp":
        need = study.steps * study.batch_size + study.eval_sequences
        prompts = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(7))]
        prompts = prompts[: min(need, len(prompts))]
        blocks = teacher_written_blocks(teacher, prompts, length, study.sharp_temperature, 7)
    heldout = blocks[-study.eval_sequences :]
    train_blocks = blocks[: -study.eval_sequences]
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    steps, hidden, sparse, nbytes = [], [], [], []
    entropy = []
    for step in range(study.steps):
        index = order[(torch.arange(study.batch_size) + step * study.batch_size) % len(order)]
        batch = train_blocks[index]
        h = teacher_targets(teacher, head, batch[:, :-1])
        logits = head.logits(h).reshape(-1, head.vocab_size)
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
        "heldout_inputs": heldout[:, :-1],
        "heldout_labels": heldout[:, 1:],
        "heldout_teacher": head.logits(h_eval).reshape(-1, head.vocab_size),
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
    evaluation = (data["heldout_inputs"], data["heldout_labels"], data["heldout_teacher"], study.mu)
    curve = [{"step": 0, **evaluate(student, *evaluation)}]
    started = time.perf_counter()
    for step in range(study.steps):
        batch = data["batches"][step]
        logits = student(input_ids=batch[:, :-1]).logits.reshape(-1, vocab)
        teacher_logits = None
        if config.startswith("online"):
            with torch.no_grad():
                teacher_logits = head.logits(data["hidden"][step])
        labels = batch[:, 1:].reshape(-1)
        loss = run_loss(config, logits, labels, teacher_logits, data["sparse"][step], study, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % study.eval_every == 0 or step + 1 == study.steps:
            curve.append({"step": step + 1, **evaluate(student, *evaluation)})
    return curve, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="teacher dir (default: the demo teacher)")
    parser.add_argument("--out", type=Path, default=Path("bench/quality-results"))
    parser.add_argument("--settings", default="demo,sharp")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated config names to run")
    parser.add_argument("--alphas", default=None, help="comma-separated CE mixes to run (e.g. 0)")
    parser.add_argument("--quick", action="store_true", help="a few steps, a few configs")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir = args.teacher
    if teacher_dir is None:
        from kdcache.demo import demo_teacher_dir

        teacher_dir = str(demo_teacher_dir())
    study = Study(teacher=teacher_dir)
    if args.steps:
        study.steps = args.steps
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
                k: v for k, v in prepared[seed].items() if not isinstance(v, list | torch.Tensor)
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
