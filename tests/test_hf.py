"""``kdcache.hf``: a cache inside Hugging Face Trainer.

KDTrainer's loss on a batch equals the loss ``kdcache train`` logged for the same batch and the
same initial student (its first step, read from metrics.jsonl), it trains with
``TrainingArguments(max_steps=...)``, and ``cache_dataset`` gives every sequence to exactly one
reader across 2 gloo ranks x DataLoader workers, also inside KDTrainer under DDP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdcache.cache import open_cache
from kdcache.cache.errors import ConfigError
from kdcache.hf import KDCollator, cache_dataset
from tests import train_helpers as helpers
from tests.test_distributed_build import run_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    """12 train sequences in several shards."""
    return helpers.make_cache(tmp_path_factory.mktemp("cache"), tiny_llama_dir,
                              helpers.read_texts(text_jsonl), num_train=12, num_holdout=2,
                              max_shard_tokens=100)  # fmt: skip


@pytest.fixture(scope="module")
def student_json(tmp_path_factory, tiny_tokenizer) -> Path:
    return helpers.student_config(tmp_path_factory.mktemp("student") / "s.json", tiny_tokenizer)


def _args(out: Path, **overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4,
                    learning_rate=3e-3, lr_scheduler_type="constant", report_to="none",
                    save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                    dataloader_num_workers=0, seed=0)  # fmt: skip
    settings.update(overrides)
    return TrainingArguments(**settings)


def _records(cache: Path, sequence_ids: list[int]):
    by_id = {record.sequence_id: record for record in open_cache(cache).sequences("train")}
    return [by_id[int(i)] for i in sequence_ids]


@pytest.mark.parametrize(("loss", "ce_weight"), [("akl", 0.25), ("fkl", 0.0), ("ce", 0.0)])
def test_kdtrainer_loss_equals_kdcache_trains_loss_on_the_same_batch(
    loss, ce_weight, small_cache, student_json, tmp_path
):
    """``kdcache train`` logs its first step's loss: that batch and that initial student, again
    through KDTrainer.compute_loss."""
    from kdcache.hf import KDTrainer
    from kdcache.trainer import TrainConfig, train
    from kdcache.trainer.data import CacheDataset
    from kdcache.trainer.student import load_student_model

    config = TrainConfig(cache=str(small_cache), student=str(student_json), out=str(tmp_path / "run"),
                         loss=loss, ce_weight=ce_weight, steps=1, batch_size=4, progress=False,
                         log_every=1, device="cpu", chunk_size=16)  # fmt: skip
    train(config)
    (logged,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    first = next(CacheDataset(open_cache(small_cache), batch_size=4).epoch_batches())  # its batch
    batch = KDCollator(small_cache)(_records(small_cache, first["sequence_ids"].tolist()))
    model, _ = load_student_model(str(student_json), seed=0)  # the run's initial student
    trainer = KDTrainer(model=model, args=_args(tmp_path / "hf"),
                        train_dataset=cache_dataset(small_cache), loss=loss, ce_weight=ce_weight,
                        chunk_size=16)  # fmt: skip
    got = trainer.compute_loss(trainer.model, batch)
    assert float(got.detach()) == pytest.approx(logged["loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("build_flags", "loss"),
    [
        (["--top-k", "4", "--tail-samples", "4"], "akl"),
        (["--top-k", "0", "--tail-samples", "8"], "fkl"),
    ],
    ids=["topk+tail", "samples"],
)
def test_kdtrainer_loss_equals_kdcache_train_for_the_other_cache_modes(
    build_flags, loss, tmp_path, tiny_llama_dir, tiny_tokenizer
):
    from typer.testing import CliRunner

    from kdcache.cli.app import app
    from kdcache.hf import KDTrainer
    from kdcache.trainer import TrainConfig, train
    from kdcache.trainer.data import CacheDataset
    from kdcache.trainer.student import load_student_model
    from tests.conftest import text_rows, write_jsonl

    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(8))
    cache = tmp_path / "cache"
    built = CliRunner().invoke(app, ["build", "--teacher", str(tiny_llama_dir), "--data", str(data),
                                     "--out", str(cache), "--max-length", "32", "--holdout", "0",
                                     *build_flags])  # fmt: skip
    assert built.exit_code == 0, built.output
    student = helpers.student_config(tmp_path / "s.json", tiny_tokenizer)
    config = TrainConfig(cache=str(cache), student=str(student), out=str(tmp_path / "run"),
                         loss=loss, ce_weight=0.1, steps=1, batch_size=2, progress=False,
                         log_every=1, device="cpu", chunk_size=16)  # fmt: skip
    train(config)
    (logged,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    first = next(CacheDataset(open_cache(cache), batch_size=2).epoch_batches())
    batch = KDCollator(cache)(_records(cache, first["sequence_ids"].tolist()))
    model, _ = load_student_model(str(student), seed=0)
    trainer = KDTrainer(model=model, args=_args(tmp_path / "hf"), train_dataset=cache_dataset(cache),
                        loss=loss, ce_weight=0.1, chunk_size=16)  # fmt: skip
    got = trainer.compute_loss(trainer.model, batch)
    assert float(got.detach()) == pytest.approx(logged["loss"], rel=1e-5)


def test_kdtrainer_trains_a_tiny_student_with_max_steps(small_cache, student_json, tmp_path):
    from kdcache.hf import KDTrainer
    from kdcache.trainer.student import load_student_model

    model, _ = load_student_model(str(student_json), seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    collator = KDCollator(small_cache)
    fixed = collator(_records(small_cache, list(range(8))))
    trainer = KDTrainer(model=model, args=_args(tmp_path, max_steps=25), loss="akl",
                        train_dataset=cache_dataset(small_cache), data_collator=collator)  # fmt: skip
    with torch.no_grad():
        start = float(trainer.compute_loss(model, fixed))
    result = trainer.train()
    assert result.global_step == 25
    with torch.no_grad():
        end = float(trainer.compute_loss(model, fixed))
    assert end < 0.8 * start, (start, end)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert "lm_head.weight" in changed and len(changed) == len(before)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 25 and all(torch.isfinite(torch.tensor(logged)))


def test_collator_carries_the_teacher_targets_of_the_cache_mode(small_cache):
    records = _records(small_cache, [0, 1, 2])
    batch = KDCollator(small_cache)(records)
    longest = max(record.num_tokens for record in records)
    assert batch["input_ids"].shape == (3, longest)
    assert batch["topk_ids"].shape[:2] == (3, longest)
    row, record = 1, records[1]
    positions = torch.as_tensor(record.positions, dtype=torch.long)
    torch.testing.assert_close(batch["topk_ids"][row, positions].long(),
                               torch.as_tensor(record.topk_ids).long())  # fmt: skip
    assert int(batch["attention_mask"][row].sum()) == record.num_tokens


def test_refusals(small_cache, student_json, tmp_path):
    from kdcache.hf import KDTrainer
    from kdcache.trainer.student import load_student_model

    with pytest.raises(ConfigError, match=r"no 'nope' split"):
        cache_dataset(small_cache, split="nope")
    model, _ = load_student_model(str(student_json), seed=0)
    with pytest.raises(ConfigError, match=r"unknown loss 'kl'"):
        KDTrainer(model=model, args=_args(tmp_path), train_dataset=cache_dataset(small_cache),
                  loss="kl")  # fmt: skip
    with pytest.raises(ConfigError, match=r"KDTrainer needs data_collator=KDCollator"):
        KDTrainer(model=model, args=_args(tmp_path), train_dataset=[1, 2], loss="akl")
    with pytest.raises(ConfigError, match=r"KDCollator batches the items of"):
        KDCollator(small_cache)([{"input_ids": [1, 2]}])
    with pytest.raises(ConfigError, match=r"KDCollator\(\) has no cache"):
        KDCollator()(_records(small_cache, [0]))
    unbound = KDCollator()  # KDTrainer binds it to its dataset's cache
    KDTrainer(model=model, args=_args(tmp_path), train_dataset=cache_dataset(small_cache),
              data_collator=unbound)  # fmt: skip
    assert unbound.temperature == open_cache(small_cache).manifest["temperature"]


def test_dataset_splits_by_worker_in_one_process(small_cache):
    dataset = cache_dataset(small_cache, seed=1)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    ids = [record.sequence_id for record in loader]
    assert sorted(ids) == list(range(12))  # each sequence once, from one of the two workers


def _read_on_rank(rank: int, world_size: int, cache: str, workers: int):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        dataset = cache_dataset(cache, seed=3)
        dataset.set_epoch(1)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers)
        return [record.sequence_id for record in loader]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("workers", [0, 2])
def test_two_gloo_ranks_read_disjoint_shares_of_every_sequence(small_cache, workers):
    first, second = run_ranks(_read_on_rank, 2, str(small_cache), workers)
    assert isinstance(first, list) and isinstance(second, list), (first, second)
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == list(range(12))


def _kdtrainer_on_rank(rank: int, world_size: int, cache: str, student: str, out: str):
    from kdcache.hf import KDTrainer
    from kdcache.trainer.student import load_student_model

    model, _ = load_student_model(student, seed=0)
    trainer = KDTrainer(model=model, args=_args(Path(out), max_steps=2,
                                                per_device_train_batch_size=2,
                                                ddp_find_unused_parameters=False),
                        train_dataset=cache_dataset(cache), loss="akl")  # fmt: skip
    seen: list[int] = []
    collator = trainer.data_collator

    def recording(records):
        seen.extend(record.sequence_id for record in records)
        return collator(records)

    trainer.data_collator = recording
    trainer.train()
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return seen, weights.tolist()


def test_kdtrainer_under_ddp_reads_each_ranks_share_and_keeps_the_ranks_in_sync(
    small_cache, student_json, tmp_path
):
    results = run_ranks(_kdtrainer_on_rank, 2, str(small_cache), str(student_json), str(tmp_path))
    (seen0, weights0), (seen1, weights1) = results
    # each rank collated 2 batches of 2 of its own share (plus what its loader fetched ahead)
    assert len(seen0) >= 4 and len(seen1) >= 4 and not set(seen0) & set(seen1)
    assert weights0 == weights1  # DDP synchronized the gradients of different batches


def test_the_readme_trainer_snippet_runs_as_written(small_cache, tiny_llama_dir, tmp_path):
    """The README's lines, with the tiny model, the test cache and 2 steps on CPU."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "KDTrainer" in block]  # fmt: skip
    for old, new in (('"Qwen/Qwen2.5-0.5B"', repr(str(tiny_llama_dir))),
                     ('"caches/qwen-1.5b"', repr(str(small_cache))),
                     ('"runs/hf-akl"', repr(str(tmp_path / "hf"))), ("max_steps=20000", "max_steps=2"),
                     ("bf16=True", "use_cpu=True"), ('report_to="wandb"', 'report_to="none"')):  # fmt: skip
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2


def test_kdtrainer_autocasts_the_fused_loss_under_bf16(small_cache, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdcache.hf import KDTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    trainer = KDTrainer(model=model, args=_args(tmp_path, max_steps=2, bf16=True),
                        train_dataset=cache_dataset(small_cache), loss="fkl")  # fmt: skip
    seen: list[torch.dtype] = []
    linear = model.model.layers[0].mlp.down_proj  # a Linear of the body: bf16 under autocast
    hook = linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    batch = KDCollator(small_cache)(_records(small_cache, [0, 1]))
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    hook.remove()
    assert torch.isfinite(loss) and seen[-1] == torch.bfloat16  # (earlier: the fp32 head probe)
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kdtrainer_on_cuda_matches_kdcache_train_and_trains_in_bf16(small_cache, student_json,
                                                                    tmp_path):  # fmt: skip
    from kdcache.hf import KDTrainer
    from kdcache.trainer import TrainConfig, train
    from kdcache.trainer.data import CacheDataset
    from kdcache.trainer.student import load_student_model

    config = TrainConfig(cache=str(small_cache), student=str(student_json), out=str(tmp_path / "run"),
                         loss="akl", ce_weight=0.25, steps=1, batch_size=4, progress=False,
                         log_every=1, device="cuda", dtype="float32", chunk_size=16)  # fmt: skip
    train(config)
    (logged,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    first = next(CacheDataset(open_cache(small_cache), batch_size=4).epoch_batches())
    batch = KDCollator(small_cache)(_records(small_cache, first["sequence_ids"].tolist()))
    model, _ = load_student_model(str(student_json), seed=0)
    trainer = KDTrainer(model=model, args=_args(tmp_path / "hf", use_cpu=False),
                        train_dataset=cache_dataset(small_cache), loss="akl", ce_weight=0.25,
                        chunk_size=16)  # fmt: skip
    batch = {key: value.to(trainer.args.device) for key, value in batch.items()}
    got = trainer.compute_loss(trainer.model, batch)
    assert float(got.detach()) == pytest.approx(logged["loss"], rel=1e-4)
    model, _ = load_student_model(str(student_json), seed=0)
    bf16 = KDTrainer(model=model, args=_args(tmp_path / "bf16", use_cpu=False, bf16=True),
                     train_dataset=cache_dataset(small_cache), loss="akl")  # fmt: skip
    bf16.train()
    logged_bf16 = [entry["loss"] for entry in bf16.state.log_history if "loss" in entry]
    assert bf16.state.global_step == 3 and all(np.isfinite(logged_bf16))
