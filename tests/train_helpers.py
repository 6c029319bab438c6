"""Test caches for the trainer tests: a tiny teacher's real forward written with ShardWriter.

Imported by the trainer test modules as ``from tests import train_helpers as helpers`` (the
repository root is on ``sys.path`` under ``python -m pytest``, as for ``tests.conftest``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kdcache.cache import SequenceRecord, ShardWriter, shard_summary, write_manifest
from kdcache.cache.build.fingerprint import tokenizer_fingerprint


def token_blocks(tokenizer, texts: list[str], num_blocks: int, seed: int = 0) -> list[np.ndarray]:
    """Blocks of 12-40 tokens cut from the concatenated texts (deterministic)."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    rng = np.random.default_rng(seed)
    blocks, start = [], 0
    while len(blocks) < num_blocks:
        length = int(rng.integers(12, 41))
        if start + length > len(stream):
            start = 0
        blocks.append(np.asarray(stream[start : start + length], dtype=np.int32))
        start += length
    return blocks


@torch.no_grad()
def teacher_records(
    teacher, blocks, top_k: int, temperature: float, first_id: int = 0, observed: bool = False
):
    """SequenceRecords holding the teacher's own top-k + tail mass at every position (and with
    ``observed`` the log-prob of each next token, NaN at the last position)."""
    records = []
    for offset, block in enumerate(blocks):
        logits = teacher(input_ids=torch.from_numpy(block).long().unsqueeze(0)).logits[0]
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # (T, V)
        top = logprobs.topk(top_k, dim=-1)
        tail = (1.0 - top.values.exp().sum(-1)).clamp(min=0.0)
        next_logprobs = None
        if observed:
            following = torch.from_numpy(block[1:]).long()[:, None]
            picked = logprobs[:-1].gather(1, following)[:, 0]
            next_logprobs = torch.cat([picked, torch.tensor([float("nan")])]).numpy()
        records.append(
            SequenceRecord(
                sequence_id=first_id + offset,
                input_ids=block,
                topk_ids=top.indices.numpy().astype(np.int32),
                topk_logprobs=top.values.numpy().astype(np.float32),
                tail_mass=tail.numpy().astype(np.float32),
                positions=np.arange(len(block), dtype=np.int32),
                observed_logprobs=next_logprobs,
            )
        )
    return records


def make_cache(
    cache_dir: Path,
    teacher_dir: Path,
    texts: list[str],
    *,
    num_train: int = 64,
    num_holdout: int = 16,
    top_k: int = 8,
    temperature: float = 1.0,
    max_shard_tokens: int = 600,
    observed: bool = True,
) -> Path:
    """A complete cache (train + holdout splits, tokenizer/) from the teacher in ``teacher_dir``
    (``observed``: with the observed-token log-prob column, as ``kdcache build`` writes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    blocks = token_blocks(tokenizer, texts, num_train + num_holdout)
    vocab_size = int(teacher.config.vocab_size)
    shards = []
    for split, part, first in (
        ("train", blocks[:num_train], 0),
        ("holdout", blocks[num_train:], num_train),
    ):
        with ShardWriter(
            cache_dir, split, top_k=top_k, vocab_size=vocab_size,
            max_shard_tokens=max_shard_tokens, observed_logprobs=observed,
        ) as writer:  # fmt: skip
            for record in teacher_records(teacher, part, top_k, temperature, first, observed):
                writer.write(record)
        shards.extend(writer.close())
    tokenizer.save_pretrained(cache_dir / "tokenizer")
    manifest = shard_summary(shards)
    manifest.update(
        teacher=str(teacher_dir),
        vocab_size=vocab_size,
        top_k=top_k,
        temperature=temperature,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    if observed:
        manifest["observed_logprobs"] = True
    write_manifest(cache_dir, manifest)
    return cache_dir


def student_config(path: Path, tokenizer, hidden: int = 32, layers: int = 1) -> Path:
    """A tiny Llama student config JSON (random init), the teacher's vocabulary."""
    config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def read_texts(jsonl: Path) -> list[str]:
    return [json.loads(line)["text"] for line in jsonl.read_text(encoding="utf-8").splitlines()]


def tiny_llama(vocab_size: int, seed: int = 0):
    """A one-layer Llama (hidden 16) for loss / objective tests, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    )  # fmt: skip
