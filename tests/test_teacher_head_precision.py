"""The teacher's head in float32 from bf16 hidden states, and the pass sized for its device.

Reference: the float64 product of the same bf16 hidden states and bf16 weight (exact products,
exact sums), log-softmaxed in float64. The documented bound (docs/BUILD.md, ``heads.fp32_linear``)
of a stored log-prob, before the storage's fp16 rounding: ``worst_case_bound`` =
``2 * H * 2**-24 * max_v sum_i |h_i w_vi|`` nats (float32 accumulation), and measured here below
``HEAD_LOGPROB_BOUND`` = 1e-4; a bf16 GEMM output misses both by orders of magnitude at |logits|
near 30-45 (its rounding alone is up to ``2**-9 * |logit|``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.cache.extraction.heads import OutputHead
from kdcache.cache.extraction.sizing import (
    CPU_BATCH_TOKENS,
    HEAD_BYTES_PER_LOGIT,
    MAX_CUDA_CHUNK_ROWS,
    MIN_CUDA_CHUNK_ROWS,
    activation_bytes_per_token,
    cpu_chunk_rows,
    size_teacher_pass,
)
from kdcache.cache.extraction.topk import DEFAULT_CHUNK_ELEMENTS, chunk_rows, topk_from_hidden

HEAD_LOGPROB_BOUND = 1e-4  # nats, the head's own error (docs/BUILD.md)


def _bf16_head(rows: int, hidden: int, vocab: int, scale: float, seed: int = 0):
    """bf16 hidden states (N, H) and a bf16 head whose logits reach about ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator) * (scale / hidden**0.5 / 3)
    return states.bfloat16(), OutputHead(weight.bfloat16(), None)


def worst_case_bound(states: torch.Tensor, head: OutputHead) -> float:
    """``2 * H * 2**-24 * max_v sum_i |h_i w_vi|``: the documented bound of a log-prob's error."""
    magnitudes = states.double().abs() @ head.weight.double().abs().T  # (N, V)
    return 2 * states.shape[-1] * 2.0**-24 * magnitudes.max().item()


def _reference_log_probs(states: torch.Tensor, head: OutputHead) -> torch.Tensor:
    logits = states.double() @ head.weight.double().T  # exact products of the bf16 operands
    return torch.log_softmax(logits, dim=-1)


@torch.inference_mode()
def test_bf16_head_logits_are_float32_within_the_bound():
    states, head = _bf16_head(64, 256, 4096, scale=30.0)
    reference = _reference_log_probs(states, head)
    assert reference.exp().sum(-1).sub(1).abs().max() < 1e-9
    logits = head.logits(states)
    assert logits.dtype == torch.float32
    got = torch.log_softmax(logits.double(), dim=-1)
    error = (got - reference).abs().max().item()
    assert error < HEAD_LOGPROB_BOUND and error <= worst_case_bound(states, head)
    # what the build did before: a bf16 GEMM output, then float32 -- far outside both bounds
    rounded = torch.nn.functional.linear(states, head.weight).float()
    old_error = (torch.log_softmax(rounded.double(), -1) - reference).abs().max().item()
    assert old_error > 5 * worst_case_bound(states, head) > 5 * HEAD_LOGPROB_BOUND


@torch.inference_mode()
@pytest.mark.parametrize("top_k", [8, 64])
def test_stored_topk_of_a_bf16_head_within_the_bound(top_k):
    """``topk_from_hidden`` in chunks (a small chunk: several chunks), bf16 operands."""
    states, head = _bf16_head(50, 128, 2048, scale=30.0, seed=1)
    reference = _reference_log_probs(states, head)
    head.keep_fp32_weight()
    ids, logprobs, tail = topk_from_hidden(states, head, top_k, chunk_elements=16 * 2048)
    expected = torch.gather(reference, 1, ids)
    error = (logprobs.double() - expected).abs().max().item()
    assert error < HEAD_LOGPROB_BOUND and error <= worst_case_bound(states, head)
    ranked = reference.argsort(dim=-1, descending=True)
    order = ranked[:, :top_k]
    gap = reference.gather(1, ranked[:, top_k - 1 : top_k + 1])  # k-th and (k+1)-th
    clear = (gap[:, 0] - gap[:, 1]) > 2 * HEAD_LOGPROB_BOUND  # no near-tie at the k-th place
    assert torch.equal(ids[clear].sort(-1).values, order[clear].sort(-1).values)
    kept = torch.logsumexp(expected, dim=-1)
    np.testing.assert_allclose(tail.double(), -torch.expm1(kept), atol=1e-5)


@torch.inference_mode()
def test_bf16_teacher_build_log_probs_within_the_bound(tiny_llama_dir):
    """The build's own TeacherRunner on a bf16 teacher (CPU bf16 tensors): stored log-probs vs
    float64 log-softmax of the model's own bf16 hidden states and head."""
    from kdcache.cache.build.teacher import TeacherRunner, load_model
    from kdcache.cache.extraction.heads import body_of

    model = load_model(str(tiny_llama_dir), torch.bfloat16, torch.device("cpu"))
    runner = TeacherRunner(model, top_k=16)
    assert runner.head is not None and runner.head.weight.dtype == torch.bfloat16
    sequence = np.arange(3, 40, dtype=np.int64) % model.config.vocab_size
    (rows,) = runner.run([sequence])
    ids = torch.as_tensor(sequence)[None]
    hidden = body_of(model)(input_ids=ids, position_ids=torch.arange(len(sequence))[None])
    reference = _reference_log_probs(hidden.last_hidden_state[0], runner.head)
    expected = reference.gather(1, torch.as_tensor(rows.topk_ids, dtype=torch.long))
    got = torch.as_tensor(rows.topk_logprobs).double()
    error = (got - expected).abs().max().item()
    bound = worst_case_bound(hidden.last_hidden_state[0], runner.head)
    assert error < HEAD_LOGPROB_BOUND and error <= bound


def test_resolve_head_accepts_a_bf16_model(tiny_llama_dir):
    """The model's own logits are bf16-rounded, ours are not: the split is still found exact."""
    from kdcache.cache.build.teacher import load_model
    from kdcache.cache.extraction.heads import resolve_head

    model = load_model(str(tiny_llama_dir), torch.bfloat16, torch.device("cpu"))
    assert resolve_head(model, torch.arange(1, 9)[None]) is not None


def test_cpu_sizes_keep_todays_values():
    config = type("Config", (), {"hidden_size": 4096, "intermediate_size": 11008})()
    for vocab in (2048, 32000, 152064):
        sizes = size_teacher_pass("cpu", vocab_size=vocab, model_config=config, dtype_bytes=4,
                                  max_length=1024)  # fmt: skip
        assert sizes.batch_tokens == CPU_BATCH_TOKENS == 16384
        assert (
            sizes.chunk_rows == chunk_rows(vocab, DEFAULT_CHUNK_ELEMENTS) == cpu_chunk_rows(vocab)
        )
    given = size_teacher_pass("cpu", vocab_size=32000, model_config=config, dtype_bytes=4,
                              max_length=1024, head_chunk_rows="512", batch_tokens=4096)  # fmt: skip
    assert (given.chunk_rows, given.batch_tokens) == (512, 4096)


def test_cuda_sizes_from_free_memory():
    """The CUDA branch selected explicitly, with a fake free-memory value."""
    config = type("Config", (), {"hidden_size": 3584, "intermediate_size": 18944,
                                 "num_attention_heads": 28})()  # fmt: skip
    free = 60 * 2**30  # what a 7B bf16 teacher leaves on an 80 GB GPU
    sizes = size_teacher_pass("cuda", vocab_size=152064, model_config=config, dtype_bytes=2,
                              max_length=4096, free_bytes=free)  # fmt: skip
    # hand-checked: 15 GiB for the head at 12 bytes per logit -> 8826 rows -> 8768 (x 64)
    assert sizes.chunk_rows == 8768
    assert sizes.chunk_rows > 50 * cpu_chunk_rows(152064)  # ~110 rows on the CPU
    head_bytes = 8768 * 152064 * HEAD_BYTES_PER_LOGIT
    per_token = 2 * (8 * 3584 + 3 * 18944) + 4 * 3584
    assert per_token == activation_bytes_per_token(config, 2, 4096)
    assert sizes.batch_tokens == int((free - head_bytes) * 0.5) // per_token
    assert sizes.batch_tokens > 4 * 16384  # the 80 GB GPU is no longer mostly idle
    tiny = size_teacher_pass("cuda", vocab_size=152064, model_config=config, dtype_bytes=2,
                             max_length=4096, free_bytes=2**28)  # fmt: skip
    assert tiny.chunk_rows == MIN_CUDA_CHUNK_ROWS and tiny.batch_tokens == 4096
    huge = size_teacher_pass("cuda", vocab_size=32000, model_config=config, dtype_bytes=2,
                             max_length=4096, free_bytes=2**40)  # fmt: skip
    assert huge.chunk_rows == MAX_CUDA_CHUNK_ROWS
    fixed = size_teacher_pass("cuda", vocab_size=32000, model_config=config, dtype_bytes=2,
                              max_length=4096, head_chunk_rows=256, batch_tokens="8192",
                              free_bytes=free)  # fmt: skip
    assert (fixed.chunk_rows, fixed.batch_tokens) == (256, 8192)


def test_bad_sizes_are_refused(tiny_llama_dir, tmp_path):
    from kdcache.cache.build.config import BuildConfig
    from kdcache.cache.errors import ConfigError

    for flag, value in (("batch_tokens", "lots"), ("head_chunk_rows", 0)):
        with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')} must be auto or a"):
            BuildConfig(teacher="t", data="d", out=tmp_path / "c", **{flag: value})
    config = BuildConfig(teacher="t", data="d", out=tmp_path / "c", batch_tokens="4096")
    assert config.batch_tokens == 4096 and config.head_chunk_rows == "auto"


def test_teacher_is_loaded_straight_to_its_device(tiny_llama_dir, monkeypatch):
    """``from_pretrained`` gets ``device_map={"": device}`` + ``low_cpu_mem_usage`` (no full
    host copy per rank), for CUDA devices too (the kwargs; the load itself runs on the CPU)."""
    from transformers import AutoModelForCausalLM

    from kdcache.cache.build import teacher

    assert teacher.model_load_kwargs(torch.bfloat16, torch.device("cuda", 3)) == {
        "dtype": torch.bfloat16, "device_map": {"": "cuda:3"}, "low_cpu_mem_usage": True,
    }  # fmt: skip
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model = teacher.load_model(str(tiny_llama_dir), torch.float32, torch.device("cpu"))
    assert seen == {"dtype": torch.float32, "device_map": {"": "cpu"}, "low_cpu_mem_usage": True}
    assert next(model.parameters()).device.type == "cpu" and not model.training
