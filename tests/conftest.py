"""Shared fixtures: tiny tokenizers, teachers and datasets built from config, never downloaded.

Everything is written into pytest's temporary directories and loaded back through the real
``from_pretrained`` / ``load_dataset`` code paths.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def stdlib_corpus(max_chars: int = 200_000) -> list[str]:
    """A few CPython standard-library sources: text that every machine with Python has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for name in [
        "textwrap.py",
        "json/decoder.py",
        "json/encoder.py",
        "string.py",
        "bisect.py",
        "heapq.py",
        "fnmatch.py",
        "glob.py",
        "shlex.py",
        "calendar.py",
        "difflib.py",
    ]:
        path = stdlib / name
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    return texts


def make_tokenizer(
    out_dir: Path, vocab_size: int = 384, chat_template: str | None = CHATML_TEMPLATE
):
    """Train a byte-level BPE on stdlib text and save it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(stdlib_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def make_llama(out_dir: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A 2-layer Llama-style causal LM (GQA, RoPE, SwiGLU) saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _sharpen(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_gpt2(out_dir: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A 2-layer GPT-2-style causal LM (learned positions, tied lm_head) saved with its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    _sharpen(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _sharpen(model) -> None:
    """Scale the output embedding so a random model's distributions are not uniformly flat."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def text_rows(num_rows: int = 24, seed: int = 0) -> list[dict]:
    """Documents of mixed lengths cut from stdlib sources (deterministic)."""
    import random

    rng = random.Random(seed)
    corpus = "\n".join(stdlib_corpus())
    rows = []
    for index in range(num_rows):
        length = rng.choice([20, 60, 150, 400, 900])
        start = rng.randrange(0, len(corpus) - length)
        rows.append({"text": corpus[start : start + length], "id": index})
    return rows


def chat_rows(num_rows: int = 8) -> list[dict]:
    rows = []
    for index in range(num_rows):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You write Python."},
                    {"role": "user", "content": f"Question {index}: how do I sort a list?"},
                    {
                        "role": "assistant",
                        "content": f"Use sorted(items) or items.sort() ({index}).",
                    },
                    {"role": "user", "content": "And reverse it?"},
                    {"role": "assistant", "content": "Pass reverse=True."},
                ]
            }
        )
    return rows


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors and models on a shared 2-core machine: one torch thread avoids OpenMP
    oversubscription (7x faster for the trainer tests). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("gpt2"), tiny_tokenizer)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_teacher_dir(request, tiny_llama_dir, tiny_gpt2_dir) -> Path:
    """Both tiny architectures, one after the other."""
    return tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl", text_rows())


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_rows())


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for the whole session (tests/s3_server.py).

    Skipped with the reason only when moto/s3fs are missing or the server cannot start; the
    `test` extra installs both, so on CI these tests run."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as error:
        pytest.skip(f"S3 tests need moto[server] and s3fs (pip install -e '.[test]'): {error}")
    from tests.s3_server import start_server

    try:
        server = start_server(tmp_path_factory.mktemp("moto") / "server.log")
    except RuntimeError as error:
        pytest.skip(f"the local moto S3 server cannot start: {error}")
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    """The server with a fresh bucket (``s3.bucket``), its credentials in the environment, and
    kdcache's cache home (staging, read-through cache) in this test's tmp_path."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KDCACHE_CACHE_HOME", str(tmp_path / "kdcache-home"))
    s3_server.bucket = s3_server.new_bucket()
    return s3_server


def crash_shard_writes_at(monkeypatch, call: int):
    """Make the ``call``-th ``ShardWriter.write`` raise "simulated crash" (a build dying mid-way);
    returns a function that restores the real ``write``."""
    from kdcache.cache.format.shards import ShardWriter

    original_write, calls = ShardWriter.write, {"n": 0}

    def failing_write(self, record):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("simulated crash")
        original_write(self, record)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    return lambda: monkeypatch.setattr(ShardWriter, "write", original_write)
