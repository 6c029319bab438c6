"""CUDA paths: bf16 build, the fused chunked loss on the device, nccl DDP, build + train on a GPU.

Marked ``gpu`` (excluded from the default run; ``python -m pytest -m gpu``, which
bench/gpu_check.sh runs) and skipped with the reason when ``torch.cuda.is_available()`` is False.

Tolerance of the bf16 build (``test_bf16_build_equals_fp32_build_except_near_ties``): a bf16
forward gets every log-prob only to within some error ``delta``, measured per cache as the largest
``|log p_bf16 - log p_fp32|`` over the ids both caches stored at the same position. Two ids whose
fp32 log-probs differ by more than ``2 * delta`` cannot swap places, so a stored id may differ from
the fp32 build's only where the fp32 log-probs of the two ids at that rank are within
``2 * delta`` (a near-tie); ``delta`` itself must stay below 0.1 nats and half of the positions
must match exactly (the tiny test teacher is flat: a quarter of its positions hold a near-tie in
bf16), so a broken bf16 path cannot pass by inflating the bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache.build.pipeline import BuildConfig, build_cache
from kdcache.cache.read.reader import open_cache
from tests import train_helpers as helpers

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


def _build(teacher: Path, data: Path, out: Path, **settings) -> Path:
    options = dict(max_length=64, holdout=0.25, limit=16, progress=False)
    build_cache(
        BuildConfig(teacher=str(teacher), data=str(data), out=out, **{**options, **settings})
    )
    return out


def _fp32_log_probs(teacher: Path) -> Callable[[np.ndarray], torch.Tensor]:
    """``input_ids (T,) -> (T, V)`` log-probs of the teacher's own fp32 forward on CUDA."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).cuda().eval()

    @torch.inference_mode()
    def log_probs(input_ids: np.ndarray) -> torch.Tensor:
        logits = model(input_ids=torch.from_numpy(input_ids).long()[None].cuda()).logits[0]
        return torch.log_softmax(logits.float(), -1).cpu()

    return log_probs


def test_bf16_build_equals_fp32_build_except_near_ties(tiny_llama_dir, text_jsonl, tmp_path):
    fp32 = open_cache(_build(tiny_llama_dir, text_jsonl, tmp_path / "fp32", top_k=8,
                             device="cuda", dtype="float32"))  # fmt: skip
    bf16 = open_cache(
        _build(tiny_llama_dir, text_jsonl, tmp_path / "bf16", top_k=8, device="cuda")
    )  # fmt: skip (auto: bf16 on CUDA)
    assert bf16.manifest["settings"]["dtype"] == "bfloat16"
    pairs = list(zip(fp32.sequences("train"), bf16.sequences("train"), strict=True))
    errors, gaps, exact, positions = [], [], 0, 0
    reference = _fp32_log_probs(tiny_llama_dir)
    for ref, low in pairs:
        np.testing.assert_array_equal(ref.input_ids, low.input_ids)
        dense = reference(ref.input_ids).numpy()  # (T, V)
        for row in range(len(ref.positions)):
            positions += 1
            exact += bool(np.array_equal(ref.topk_ids[row], low.topk_ids[row]))
            common = np.intersect1d(ref.topk_ids[row], low.topk_ids[row])
            lp_low = dict(
                zip(low.topk_ids[row].tolist(), low.topk_logprobs[row].tolist(), strict=True)
            )
            errors += [abs(lp_low[i] - dense[row, i]) for i in common.tolist()]
            for rank in np.flatnonzero(ref.topk_ids[row] != low.topk_ids[row]):
                a, b = ref.topk_ids[row, rank], low.topk_ids[row, rank]
                gaps.append(abs(dense[row, a] - dense[row, b]))
    delta = max(errors)
    assert delta < 0.1, delta
    assert exact >= 0.5 * positions, (exact, positions)  # the tiny teacher is flat: many near-ties
    assert all(gap <= 2 * delta for gap in gaps), (max(gaps), delta)


@pytest.fixture(scope="module")
def mode_caches(tmp_path_factory, tiny_llama_dir, text_jsonl) -> dict[str, Path]:
    """One fp32 CPU-built cache per storage mode."""
    root = tmp_path_factory.mktemp("modes")
    settings = {
        "topk_bucket": dict(top_k=8, tail_samples=0),
        "topk_samples": dict(top_k=8, tail_samples=8),
        "samples": dict(top_k=0, tail_samples=24),
    }
    return {
        mode: _build(tiny_llama_dir, text_jsonl, root / mode, device="cpu", **options)
        for mode, options in settings.items()
    }


@pytest.mark.parametrize("mode", ["topk_bucket", "topk_samples", "samples"])
def test_fused_chunked_loss_on_cuda_equals_the_dense_reference(mode_caches, mode):
    """The chunked objective on CUDA == the full-logits objective on the CPU (loss and grads)."""
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.objective import DistillObjective, batch_loss
    from kdcache.trainer.targets import LossOptions, target_for_cache

    cache = open_cache(mode_caches[mode])
    target = target_for_cache(cache.manifest)
    batch = collate_records(list(cache.sequences("train"))[:4], target)
    kind, alpha = ("fkl", 0.0) if mode == "samples" else ("akl", 0.25)
    counts = float(batch["distill_mask"].sum()), float((batch["labels"] != -100).sum())
    results = []
    for device, chunked in (("cpu", False), ("cuda", True)):
        model = helpers.tiny_llama(cache.manifest["vocab_size"]).to(device)
        objective = DistillObjective(model, target, LossOptions(kind=kind), alpha=alpha,
                                     chunk_size=7, chunked=chunked)  # fmt: skip
        on_device = {key: value.to(device) for key, value in batch.items()}
        loss = batch_loss(objective, on_device, *counts)
        loss.backward()
        grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters()}
        results.append((loss.detach().cpu(), grads))
    (dense_loss, dense_grads), (cuda_loss, cuda_grads) = results
    torch.testing.assert_close(cuda_loss, dense_loss, rtol=1e-4, atol=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(cuda_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert max(float(g.abs().max()) for g in dense_grads.values()) > 1e-4


def _train(cache: Path, student: Path, out: Path, ranks: int, batch_size: int) -> Path:
    """``kdcache train`` for one step on CUDA, under torchrun when ``ranks`` > 1; the final dir."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node", str(ranks)] if ranks > 1 else [sys.executable]  # fmt: skip
    command = [*launch, "-m", "kdcache.cli", "train", "--cache", str(cache), "--student",
               str(student), "--out", str(out), "--steps", "1", "--batch-size", str(batch_size),
               "--ce-weight", "0.25", "--lr", "3e-3", "--no-progress", "--device", "cuda",
               "--dtype", "float32"]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out / "final"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for nccl")
def test_two_nccl_ranks_make_the_update_of_one_rank_with_the_doubled_batch(
    tiny_llama_dir, text_jsonl, tiny_tokenizer, tmp_path
):
    from safetensors.torch import load_file

    from kdcache.trainer.student import load_student_model

    cache = helpers.make_cache(tmp_path / "cache", tiny_llama_dir, helpers.read_texts(text_jsonl),
                               num_train=4, num_holdout=2, max_shard_tokens=10_000)  # fmt: skip
    student = helpers.student_config(tmp_path / "student.json", tiny_tokenizer)
    one = load_file(
        str(_train(cache, student, tmp_path / "one", ranks=1, batch_size=4) / "model.safetensors")
    )
    two = load_file(
        str(_train(cache, student, tmp_path / "two", ranks=2, batch_size=2) / "model.safetensors")
    )
    initial = load_student_model(str(student), seed=0)[0].state_dict()
    largest = 0.0
    for name, weight in one.items():
        largest = max(largest, float((weight - initial[name]).abs().max()))
        torch.testing.assert_close(two[name] - initial[name], weight - initial[name],
                                   rtol=1e-3, atol=1e-5, msg=name)  # fmt: skip
    assert largest > 1e-4  # the step moved the weights


def test_build_and_train_round_trip_on_cuda(tiny_llama_dir, text_jsonl, tiny_tokenizer, tmp_path):
    """bf16 build on the GPU -> train on the GPU -> held-out KL to the teacher falls."""
    from kdcache.trainer import TrainConfig, train

    cache = _build(tiny_llama_dir, text_jsonl, tmp_path / "cache", device="cuda", limit=24)
    student = helpers.student_config(tmp_path / "student.json", tiny_tokenizer)
    settings = dict(cache=str(cache), student=str(student), loss="akl", ce_weight=0.25, lr=3e-3,
                    batch_size=4, eval_every=1, progress=False, device="cuda")  # fmt: skip
    start = train(TrainConfig(out=str(tmp_path / "start"), steps=1, **settings))
    trained = train(TrainConfig(out=str(tmp_path / "trained"), steps=40, **settings))
    assert trained.eval["fkl_bucket"] < start.eval["fkl_bucket"], (start.eval, trained.eval)
    assert (trained.final / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["topk-bucket", "topk-samples", "samples", "dense"])
def test_bf16_head_on_cuda_matches_the_fp32_reference(mode, monkeypatch):
    """Issue 23: the CUDA bf16 head (bf16 operands, fp32 accumulation) in every cache mode."""
    from kdcache.trainer.chunked import chunked_head_loss
    from tests import test_head_precision as precision

    hidden, head, kernel, reference = precision._problem(mode, device="cuda")
    seen = precision._record_gemms(monkeypatch)
    got = chunked_head_loss(hidden, head, kernel, chunk_size=16, compute_dtype=torch.bfloat16)
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    want = reference()
    torch.testing.assert_close(got, want, rtol=precision.LOSS_RTOL, atol=1e-4)
    inputs = [hidden, head.weight, head.bias]
    for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs),
                    strict=True):  # fmt: skip
        assert float((g - w).abs().max() / w.abs().max()) < precision.GRAD_RTOL
