"""``kdcache train --fsdp``: FSDP2 on 2 gloo ranks (CPU) equals DDP; sharded checkpoints resume on
another number of ranks; final/ is one consolidated save_pretrained model.

The ranks are forked by ``run_ranks`` (tests/test_distributed_build.py) with torchrun's
environment and call ``train(config)``, as ``torchrun -m kdcache.cli train --fsdp`` does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcache.cache.errors import ConfigError
from kdcache.trainer import TrainConfig
from kdcache.trainer.parallel import mixed_precision
from tests import train_helpers as helpers
from tests.test_distributed_build import run_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    """12 train sequences in one shard: 2 partitions split it by record."""
    out = tmp_path_factory.mktemp("fsdp") / "cache"
    texts = helpers.read_texts(text_jsonl)
    return helpers.make_cache(
        out, tiny_llama_dir, texts, num_train=12, num_holdout=2, max_shard_tokens=100_000
    )


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("student") / "s.json"
    return helpers.student_config(path, tiny_tokenizer, layers=2)


def _config(cache, student, out, **overrides) -> TrainConfig:
    settings = dict(
        cache=str(cache), student=str(student), out=str(out), loss="akl", ce_weight=0.25,
        steps=4, batch_size=2, lr=3e-3, warmup_steps=0, progress=False, log_every=1,
        device="cpu", save_every=2,
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def _train_rank(rank: int, world_size: int, config: TrainConfig):
    from kdcache.trainer import loop

    result = loop.train(config)
    return result.steps, result.resumed_from


def _close(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-4, atol=atol, msg=name)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_fsdp_on_two_ranks_equals_ddp_and_resumes_on_one_rank(cache, student, tmp_path):
    """2 ranks x batch 2 x accumulation 2, AdamW, 4 steps: --fsdp ends with DDP's weights; its
    sharded step-2 checkpoint resumed on 1 rank (accumulation 4: the same global batch) ends
    with the uninterrupted FSDP run's weights; final/ loads with transformers alone."""
    from transformers import AutoModelForCausalLM

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert run_ranks(_train_rank, 2, _config(cache, student, ddp, grad_accum=2)) == [(4, None)] * 2
    results = run_ranks(_train_rank, 2, _config(cache, student, fsdp, grad_accum=2, fsdp=True))
    assert results == [(4, None)] * 2, results
    expected = _weights(fsdp / "final")
    _close(expected, _weights(ddp / "final"), atol=1e-5)

    step = fsdp / "step-2"
    assert (step / "sharded" / ".metadata").is_file()  # DCP: each rank wrote its shards
    assert not (step / "model.safetensors").exists()
    assert "optimizer" not in torch.load(step / "trainer_state.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(fsdp / "final")
    assert sum(p.numel() for p in model.parameters()) > 0

    shutil.rmtree(fsdp / "final")  # as a crash in step 3 leaves it
    shutil.rmtree(fsdp / "step-4", ignore_errors=True)
    one = run_ranks(_train_rank, 1, _config(cache, student, fsdp, grad_accum=4, fsdp=True,
                                            resume=True))  # fmt: skip
    assert one == [(4, 2)], one
    _close(_weights(fsdp / "final"), expected, atol=1e-5)


def test_fsdp_policy_and_refusals(tmp_path):
    policy = mixed_precision(torch.device("cuda"), torch.bfloat16)  # the CUDA branch, selected
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision(torch.device("cpu"), None) is None
    assert mixed_precision(torch.device("cuda"), None) is None  # fp32 runs stay fp32
    with pytest.raises(ConfigError, match="--fsdp with --eval-every is not supported"):
        TrainConfig(cache="c", student="s", out=str(tmp_path), fsdp=True, eval_every=10)


def _train_rank_sgd(rank: int, world_size: int, config: TrainConfig, bf16: bool):
    """A rank with plain SGD (the update is -lr x gradient) and, with ``bf16``, the CUDA
    branch's mixed-precision policy selected on the CPU: bf16 params, fp32 reduction."""
    from kdcache.trainer import loop, parallel

    loop.build_optimizer = lambda model, config: torch.optim.SGD(model.parameters(), lr=config.lr)
    if bf16:  # this forked process only
        selected = mixed_precision(torch.device("cuda"), torch.bfloat16)
        parallel.mixed_precision = lambda device, autocast: selected
    return loop.train(config).steps


def test_fsdp_with_bf16_parameters_and_fp32_reduction_gives_the_fp32_gradient(
    cache, student, tmp_path
):
    """The CUDA mixed-precision policy run on 2 gloo ranks: one SGD step's update (-lr x the
    averaged gradient) is within 5% (relative, per tensor) of the fp32 FSDP run's, and not equal
    to it (the bf16 compute did happen). bf16 keeps 8 mantissa bits (0.4% per rounding)."""
    from kdcache.trainer.student import load_student_model

    initial = load_student_model(str(student), seed=0)[0].state_dict()
    updates = {}
    for bf16 in (False, True):
        out = tmp_path / f"bf16-{bf16}"
        config = _config(cache, student, out, steps=1, save_every=0, fsdp=True, lr=1.0)
        assert run_ranks(_train_rank_sgd, 2, config, bf16) == [1, 1]
        weights = _weights(out / "final")
        assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # fp32 masters
        updates[bf16] = {name: weights[name] - initial[name] for name in weights}
    differs = False
    for name, exact in updates[False].items():
        error = (updates[True][name] - exact).norm() / exact.norm().clamp_min(1e-12)
        assert error < 0.05, (name, float(error))
        differs |= bool(error > 0)
    assert differs


@pytest.mark.slow  # torchrun starts fresh interpreters: ~30-60 s on 2 busy cores
def test_torchrun_train_fsdp_command(cache, student, tmp_path):
    """``torchrun --nproc-per-node 2 -m kdcache.cli train --fsdp``: sharded step-1, final/."""
    import os
    import subprocess
    import sys

    from tests.test_distributed_build import free_port

    out = tmp_path / "torchrun"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}",
            "-m", "kdcache.cli", "train", "--fsdp", "--cache", str(cache), "--student",
            str(student), "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--save-every", "1", "--device", "cpu", "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "step-1" / "sharded" / ".metadata").is_file()
    assert (out / "final" / "model.safetensors").is_file()
