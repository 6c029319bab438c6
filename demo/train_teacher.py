"""Train the shipped demo teacher: a byte-level BPE tokenizer and a small Llama on the stdlib.

    python -m kdcache.demo.train_teacher --out demo/teacher

Reproducible: seeded (tokenizer training, init, data order), fixed token budget, CPU fp32 with
``torch.set_num_threads(2)`` by default. Prints and writes ``training.json`` with the held-out
perplexity on ``teacher-val`` and ``demo`` (measured on the saved, rounded weights), the wall time
and every setting. The weights are stored in float16 (to stay under 10 MB) and the config asks
for float32 at load time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdcache.cache.requirements import transformers_dtype_kwargs
from kdcache.demo import corpus

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# ChatML; the assistant turns are wrapped in {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) can mark them.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{ message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{ '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass
class TeacherSettings:
    """Every setting of the teacher run (written to training.json)."""

    vocab_size: int = 16384
    hidden_size: int = 160
    intermediate_size: int = 432
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 1024
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 700
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 35
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    threads: int = 2
    device: str = "cpu"

    @property
    def tokens(self) -> int:
        """The training token budget (steps x batch x sequence length)."""
        return self.steps * self.batch_size * self.seq_len


def train_tokenizer(texts: list[str], vocab_size: int, kind: str = "bpe"):
    """A byte-level ``PreTrainedTokenizerFast`` trained on ``texts`` with the demo specials.

    ``kind``: ``"bpe"`` (the demo teacher's) or ``"unigram"`` (pieces chosen by likelihood,
    not by merges, so its vocabulary is not a subset of a BPE's trained on the same texts).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in ("bpe", "unigram"):
        raise ValueError(f"kind must be 'bpe' or 'unigram', got {kind!r}")
    tok = Tokenizer(models.BPE() if kind == "bpe" else models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer_class = trainers.BpeTrainer if kind == "bpe" else trainers.UnigramTrainer
    trainer = trainer_class(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pack_tokens(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined with EOS and cut into (N, seq_len) blocks (the remainder is dropped)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for enc in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_model(s: TeacherSettings, tokenizer):
    """A randomly initialised ``LlamaForCausalLM`` from the settings (seeded by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> tuple[float, int]:
    """Mean next-token CE over all (N, T) blocks as perplexity, and the number of predicted tokens."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    return math.exp(total / max(count, 1)), count


def lr_at(step: int, s: TeacherSettings) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_teacher(out: Path, s: TeacherSettings, log_every: int = 50) -> dict:
    """Train tokenizer + model, save both to ``out``, return (and write) the training report."""
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    t0 = time.time()
    train_texts = corpus.iter_texts("teacher-train")
    tokenizer = train_tokenizer(train_texts, s.vocab_size)
    t_tok = time.time() - t0
    train_blocks = pack_tokens(tokenizer, train_texts, s.seq_len)
    val_blocks = pack_tokens(tokenizer, corpus.iter_texts("teacher-val"), s.seq_len)
    demo_blocks = pack_tokens(tokenizer, corpus.iter_texts("demo"), s.seq_len)
    print(
        f"tokenizer trained in {t_tok:.1f}s; train {train_blocks.numel():,} tokens, "
        f"val {val_blocks.numel():,}, demo {demo_blocks.numel():,}; budget {s.tokens:,} tokens "
        f"({s.tokens / train_blocks.numel():.2f} epochs)",
        flush=True,
    )
    device = torch.device(s.device)
    model = build_model(s, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": s.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(s.seed)
    order = torch.empty(0, dtype=torch.long)
    curve = []
    t_train = time.time()
    model.train()
    for step in range(s.steps):
        if len(order) < s.batch_size:
            order = torch.cat([order, torch.randperm(len(train_blocks), generator=gen)])
        idx, order = order[: s.batch_size], order[s.batch_size :]
        x = train_blocks[idx].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        if step % log_every == 0 or step == s.steps - 1:
            elapsed = time.time() - t_train
            tps = (step + 1) * s.batch_size * s.seq_len / max(elapsed, 1e-9)
            curve.append(
                {"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(elapsed, 1)}
            )
            print(
                f"step {step:5d}/{s.steps} loss {loss.item():.3f} lr {lr_at(step, s):.2e} "
                f"{tps:,.0f} tok/s elapsed {elapsed:.0f}s",
                flush=True,
            )
    train_s = time.time() - t_train
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"  # stored in fp16 for size; run it in fp32
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    # Held-out perplexity of the weights as shipped (fp16-rounded, loaded back in fp32).
    from transformers import AutoModelForCausalLM

    shipped = AutoModelForCausalLM.from_pretrained(out, **transformers_dtype_kwargs(torch.float32))
    ppl_val, n_val = perplexity(shipped, val_blocks)
    ppl_demo, n_demo = perplexity(shipped, demo_blocks)
    report = {
        "settings": asdict(s),
        "params": n_params,
        "train_tokens_available": train_blocks.numel(),
        "tokens_trained": s.tokens,
        "epochs": round(s.tokens / train_blocks.numel(), 3),
        "perplexity": {"teacher-val": round(ppl_val, 3), "demo": round(ppl_demo, 3)},
        "eval_tokens": {"teacher-val": n_val, "demo": n_demo},
        "wall_time_s": {
            "tokenizer": round(t_tok, 1),
            "train": round(train_s, 1),
            "total": round(time.time() - t0, 1),
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "curve": curve,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"held-out perplexity: teacher-val {ppl_val:.2f}, demo {ppl_demo:.2f}; "
        f"{n_params:,} params; train {train_s:.0f}s; saved to {out}",
        flush=True,
    )
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m kdcache.demo.train_teacher --out demo/teacher``."""
    defaults = TeacherSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--log-every", type=int, default=50)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    log_every = args.pop("log_every")
    train_teacher(out, TeacherSettings(**args), log_every=log_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
