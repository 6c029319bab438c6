"""The device-sized head on CUDA (marker ``gpu``; run by bench/gpu_build_scale.py --gpu-tests).

* a bf16 head's logits on CUDA are float32 from a float32-output GEMM (``fp32_output_gemm``)
  and within the documented bound of a float64 reference (tests/test_teacher_head_precision.py);
* ``auto`` sizing on a real device gives a chunk of at least the CPU's rows and a batch of at
  least ``max_length`` tokens, and a bf16 build with it equals a build with the old chunking.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.cache.extraction.heads import fp32_output_gemm
from tests.test_teacher_head_precision import (
    HEAD_LOGPROB_BOUND,
    _bf16_head,
    _reference_log_probs,
    worst_case_bound,
)

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


@torch.inference_mode()
def test_bf16_head_on_cuda_within_the_bound():
    states, head = _bf16_head(256, 1024, 32000, scale=30.0)
    reference, bound = _reference_log_probs(states, head), worst_case_bound(states, head)
    states, head.weight = states.cuda(), head.weight.cuda()
    print(f"fp32-output GEMM available: {fp32_output_gemm(head, states.device)}")
    logits = head.logits(states)
    assert logits.dtype == torch.float32
    error = (torch.log_softmax(logits.double().cpu(), -1) - reference).abs().max().item()
    print(f"max log-prob error {error:.2e} (worst-case bound {bound:.2e})")
    assert error < HEAD_LOGPROB_BOUND and error <= bound


def test_auto_sizes_on_cuda_and_equal_records(tiny_llama_dir, text_jsonl, tmp_path):
    from kdcache.cache.build.pipeline import BuildConfig, build_cache
    from kdcache.cache.read.reader import open_cache

    caches = []
    for name, rows, tokens in (("auto", "auto", "auto"), ("old", "1024", "16384")):
        out = tmp_path / name
        build_cache(BuildConfig(teacher=str(tiny_llama_dir), data=str(text_jsonl), out=out,
                                top_k=8, max_length=64, device="cuda", dtype="bfloat16",
                                head_chunk_rows=rows, batch_tokens=tokens, progress=False))  # fmt: skip
        caches.append(open_cache(out))
    for a, b in zip(caches[0].sequences("train"), caches[1].sequences("train"), strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=0.05)
