"""The GPU-scale flags of ``kdcache train``, their logic on CPU: checkpointing, compile, attention,
fused AdamW, TF32, loader workers, host syncs, learning-rate schedules, dependency floors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdcache.cache.errors import ConfigError
from kdcache.trainer import TrainConfig, train
from kdcache.trainer import model_wrapping as wrapping
from kdcache.trainer.device_settings import (
    enable_tf32,
    head_compute_dtype,
    loader_workers,
    pin_memory_for,
)
from kdcache.trainer.model_wrapping import WrapSettings, decoder_layers, wrap_model
from kdcache.trainer.objective import DistillObjective, position_rows, with_position_rows
from kdcache.trainer.optim import adamw_kwargs, build_optimizer, build_scheduler
from kdcache.trainer.targets import LossOptions
from tests import train_helpers as helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config).train()


def _batch(vocab: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "distill_mask": torch.ones_like(ids, dtype=torch.bool)}  # fmt: skip


def _ce_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one CE step through the trainer's objective (chunked head)."""
    objective = DistillObjective(model, None, LossOptions(kind="fkl"), alpha=1.0, chunk_size=7,
                                 chunked=True, compute_dtype=torch.float32)  # fmt: skip
    model.zero_grad(set_to_none=True)
    loss = objective(_batch(), 22.0, 22.0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# -- --gradient-checkpointing ---------------------------------------------------------------------


def _saved_for_backward(model) -> int:
    """Elements of the tensors autograd keeps for backward over one body forward."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model(input_ids=_batch()["input_ids"])
    return sum(sizes)


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations():
    plain = _model()
    checkpointed = wrap_model(copy.deepcopy(plain), WrapSettings(gradient_checkpointing=True),
                              torch.device("cpu"))  # fmt: skip
    # the layers' inner activations are recomputed in backward, not kept: a fraction is saved
    assert _saved_for_backward(checkpointed) < 0.2 * _saved_for_backward(plain)
    loss, grads = _ce_grads(plain)
    loss_ckpt, grads_ckpt = _ce_grads(checkpointed)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_decoder_layers_finds_the_blocks():
    model = _model(layers=3)
    assert decoder_layers(model) is model.model.layers


# -- --compile ------------------------------------------------------------------------------------


def test_compile_refuses_in_one_line_where_no_compiler_works(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("InductorError: no working C++ compiler found\ndetails...")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(wrapping, "_COMPILER_WORKS", set())  # no success remembered
    model = _model()
    with pytest.raises(ConfigError, match=r"--compile: torch.compile does not work on this "
                       r"machine \(InductorError: no working C\+\+ compiler found\); drop"):  # fmt: skip
        wrap_model(model, WrapSettings(compile=True), torch.device("cpu"))


def test_compile_refusal_comes_before_the_run_directory_is_written(small_run, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    from kdcache.cli.app import app

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(wrapping, "_COMPILER_WORKS", set())
    cache, student = small_run
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--cache", str(cache), "--student", str(student),
                                      "--out", str(out), "--steps", "2", "--compile"])  # fmt: skip
    assert result.exit_code == 2
    assert "error: --compile: torch.compile does not work on this machine (no working C++ " in (
        result.output
    )
    assert not out.exists()


def test_compile_keeps_parameter_names_and_wraps_each_layer(monkeypatch):
    compiled = []
    monkeypatch.setattr(wrapping, "check_compiler", lambda device: None)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(self))
    model = _model(layers=3)
    names = [name for name, _ in model.named_parameters()]
    wrap_model(model, WrapSettings(compile=True), torch.device("cpu"))
    assert compiled == list(model.model.layers)
    assert [name for name, _ in model.named_parameters()] == names


@pytest.mark.slow  # inductor compiles C++ on the CPU: ~30-60 s on 2 cores
def test_compiled_step_equals_eager():
    eager = _model(layers=1)
    compiled = wrap_model(copy.deepcopy(eager), WrapSettings(compile=True), torch.device("cpu"))
    loss, grads = _ce_grads(eager)
    loss_c, grads_c = _ce_grads(compiled)
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-3, atol=1e-5, msg=name)


# -- --attn-implementation ------------------------------------------------------------------------


def test_attention_implementation_reaches_the_model(tmp_path, tiny_tokenizer):
    from kdcache.trainer.student import load_student_model

    spec = str(helpers.student_config(tmp_path / "s.json", tiny_tokenizer))
    assert TrainConfig(cache="c", student="s", out="o").attn_implementation == "sdpa"
    for name in ("sdpa", "eager"):
        model, _ = load_student_model(spec, attn_implementation=name)
        assert model.config._attn_implementation == name


def test_flash_attention_without_the_package_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real(name, *a))  # fmt: skip
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package"):
        wrapping.attention_kwargs("flash_attention_2")
    assert wrapping.attention_kwargs("sdpa") == {"attn_implementation": "sdpa"}


def test_flash_attention_is_passed_through_where_installed(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    kwargs = wrapping.attention_kwargs("flash_attention_2")
    assert kwargs == {"attn_implementation": "flash_attention_2"}


# -- fused AdamW, TF32, compute dtype, loader -----------------------------------------------------


def test_adamw_is_fused_on_cuda_only():
    assert adamw_kwargs(torch.device("cuda")) == {"fused": True}
    assert adamw_kwargs(torch.device("cuda", 3)) == {"fused": True}
    assert adamw_kwargs(torch.device("cpu")) == {}
    optimizer = build_optimizer(_model(), TrainConfig(cache="c", student="s", out="o"))
    assert not optimizer.defaults.get("fused")


def test_a_resumed_optimizer_uses_this_devices_adamw():
    from kdcache.trainer.optim import load_optimizer_state

    optimizer = build_optimizer(_model(), TrainConfig(cache="c", student="s", out="o"))
    written_on_cuda = optimizer.state_dict()
    for group in written_on_cuda["param_groups"]:
        group.update(fused=True, foreach=None)  # what a checkpoint of a CUDA run holds
    load_optimizer_state(optimizer, written_on_cuda, torch.device("cpu"))
    assert not any(group["fused"] for group in optimizer.param_groups)
    load_optimizer_state(optimizer, optimizer.state_dict(), torch.device("cuda"))
    assert all(group["fused"] and not group["foreach"] for group in optimizer.param_groups)


def test_tf32_only_for_fp32_runs_on_cuda():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not enable_tf32(torch.device("cpu"), None)
        assert not enable_tf32(torch.device("cuda"), torch.bfloat16)
        assert not torch.backends.cuda.matmul.allow_tf32
        assert enable_tf32(torch.device("cuda"), None)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_head_compute_dtype_follows_the_autocast_dtype():
    assert head_compute_dtype(torch.bfloat16) == torch.bfloat16
    assert head_compute_dtype(None) == torch.float32


def test_loader_workers_default_keeps_decoding_out_of_the_cuda_training_process():
    assert TrainConfig(cache="c", student="s", out="o").num_workers is None
    assert loader_workers(None, torch.device("cuda")) == 1
    assert loader_workers(None, torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cuda")) == 3
    assert pin_memory_for(torch.device("cuda"), 1)
    assert not pin_memory_for(torch.device("cuda"), 0) and not pin_memory_for(
        torch.device("cpu"), 2
    )


def test_persistent_worker_serves_every_epoch_in_the_zero_worker_order(tmp_path, text_jsonl,
                                                                      tiny_llama_dir):  # fmt: skip
    from kdcache.cache import open_cache
    from kdcache.trainer.data import CacheDataset

    torch.manual_seed(0)
    cache_dir = helpers.make_cache(tmp_path / "cache", tiny_llama_dir,
                                   helpers.read_texts(text_jsonl))  # fmt: skip
    cache = open_cache(cache_dir)

    def epochs(workers: int, count: int = 3):
        dataset = CacheDataset(cache, batch_size=4, num_workers=workers, seed=3)
        seen, pids = [], []
        for _ in range(count):
            seen.append([b["sequence_ids"].tolist() for b in dataset.epoch_batches()])
            if workers:
                pids.append([w.pid for w in dataset._loader._iterator._workers])
        dataset.close()
        return seen, pids

    plain, _ = epochs(0)
    persistent, pids = epochs(1)
    assert persistent == plain and plain[0] != plain[1]  # each epoch its own order
    assert pids[0] == pids[1] == pids[2]  # one worker process served all epochs
    pinned = CacheDataset(cache, batch_size=4, num_workers=1, pin_memory=True)._worker_loader()
    assert pinned.pin_memory and pinned.persistent_workers  # what the loop asks for on CUDA


# -- no host sync per micro-batch -----------------------------------------------------------------


def test_position_rows_equal_the_nonzero_weights():
    batch = _batch()
    batch["distill_mask"][0, :5] = False
    batch["labels"][1, 3:] = -100
    for alpha in (0.0, 0.3, 1.0):
        from kdcache.trainer.objective import position_weights

        kd, ce = position_weights(batch["distill_mask"], batch["labels"], alpha, 10.0, 10.0)
        want = ((kd > 0) | (ce > 0)).reshape(-1).nonzero().squeeze(-1)
        assert torch.equal(position_rows(batch["distill_mask"], batch["labels"], alpha), want)
        assert torch.equal(with_position_rows(batch, alpha)["rows"], want)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_llama_dir, text_jsonl, tiny_tokenizer):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("flags")
    cache = helpers.make_cache(root / "cache", tiny_llama_dir, helpers.read_texts(text_jsonl))
    return cache, helpers.student_config(root / "s.json", tiny_tokenizer)


def _config(small_run, out, **overrides) -> TrainConfig:
    cache, student = small_run
    settings = dict(cache=str(cache), student=str(student), out=str(out), steps=6, batch_size=2,
                    lr=1e-3, progress=False, log_every=3)  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def test_micro_batches_do_not_sync_the_host(small_run, tmp_path, monkeypatch):
    """No float() in a step; no float()/item()/nonzero()/tolist() in a micro-batch's forward and
    backward; the metrics reduced once per log step (and for the final checkpoint)."""
    from kdcache.trainer import loop

    syncs, reductions, where = [], [], {"step": False, "micro": False}
    for name in ("__float__", "item", "nonzero", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            if where["micro"] or (where["step"] and _name == "__float__"):
                syncs.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def inside(key, function):
        def watched(*args, **kwargs):
            where[key] = True
            try:
                return function(*args, **kwargs)
            finally:
                where[key] = False

        return watched

    reduce = loop._Run._reduce_metrics

    def counted_reduce(self):
        reductions.append(self.step)
        return reduce(self)

    monkeypatch.setattr(loop._Run, "_optimizer_step", inside("step", loop._Run._optimizer_step))
    monkeypatch.setattr(loop, "batch_loss", inside("micro", loop.batch_loss))
    monkeypatch.setattr(torch.Tensor, "backward", inside("micro", torch.Tensor.backward))
    monkeypatch.setattr(loop._Run, "_reduce_metrics", counted_reduce)
    result = train(_config(small_run, tmp_path / "run", grad_accum=3, log_every=3))
    assert syncs == []
    assert reductions == [3, 6, 6]  # the log steps, then the final save
    lines = [json.loads(x) for x in (result.out / "metrics.jsonl").open()]
    assert [m["step"] for m in lines if m["kind"] == "train"] == [3, 6]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in lines)
    assert result.loss == lines[-1]["loss"]


def test_rows_are_computed_on_the_host_not_in_the_objective(monkeypatch):
    """The objective uses the host's rows: nonzero() never runs on the (device) batch."""
    model = _model()
    objective = DistillObjective(model, None, LossOptions(kind="fkl"), alpha=1.0, chunk_size=7,
                                 chunked=True)  # fmt: skip
    batch = with_position_rows(_batch(), 1.0)
    calls = []
    original = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))  # fmt: skip
    with_rows = objective(batch, 22.0, 22.0)
    assert calls == []
    monkeypatch.undo()
    without = objective({k: v for k, v in batch.items() if k != "rows"}, 22.0, 22.0)
    torch.testing.assert_close(with_rows, without, rtol=0, atol=0)


# -- learning-rate schedules ----------------------------------------------------------------------


def _lrs(name: str, total: int = 10, **overrides) -> list[float]:
    config = TrainConfig(cache="c", student="s", out="o", lr=1e-3, lr_scheduler=name, **overrides)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, total)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_lr_curves_equal_the_hand_computation():
    peak, low, total, warmup = 1e-3, 1e-4, 10, 2
    warm = [peak * (s + 1) / warmup for s in range(warmup)]  # kdcache's warmup: first step moves
    progress = [(s - warmup) / (total - warmup) for s in range(warmup, total)]
    cosine = warm + [low + (peak - low) * 0.5 * (1 + math.cos(math.pi * p)) for p in progress]
    linear = warm + [low + (peak - low) * (1 - p) for p in progress]
    constant = warm + [peak] * (total - warmup)
    # wsd, decay over the last 30% (3 steps: 7, 8, 9 -> progress 0, 1/3, 2/3)
    wsd = warm + [peak] * 5 + [low + (peak - low) * 0.5 * (1 + math.cos(math.pi * k / 3))
                               for k in range(3)]  # fmt: skip
    for name, want in (("cosine", cosine), ("linear", linear), ("constant", constant),
                       ("wsd", wsd)):  # fmt: skip
        got = _lrs(name, warmup_ratio=0.2, min_lr=low, decay_ratio=0.3)
        assert got == pytest.approx(want, rel=1e-12), name
    assert _lrs("cosine", warmup_steps=2) == pytest.approx(
        warm + [peak * 0.5 * (1 + math.cos(math.pi * p)) for p in progress], rel=1e-12
    )  # min_lr 0: the schedule of runs before --lr-scheduler existed


def test_lr_decay_matches_hugging_face_after_the_warmup():
    import transformers
    from transformers import get_linear_schedule_with_warmup

    get_cosine_with_min_lr_schedule_with_warmup = getattr(
        transformers, "get_cosine_with_min_lr_schedule_with_warmup", None
    )
    if get_cosine_with_min_lr_schedule_with_warmup is None:  # added in transformers 4.38
        pytest.skip(f"transformers {transformers.__version__} has no cosine-with-min-lr schedule")

    def hf(make, total=12, warmup=3, **kwargs):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = make(optimizer, num_warmup_steps=warmup, num_training_steps=total, **kwargs)
        lrs = []
        for _ in range(total):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return lrs

    ours = _lrs("cosine", total=12, warmup_steps=3, min_lr=2e-4)
    theirs = hf(get_cosine_with_min_lr_schedule_with_warmup, min_lr_rate=0.2)
    assert ours[3:] == pytest.approx(theirs[3:], rel=1e-9)
    assert _lrs("linear", total=12, warmup_steps=3)[3:] == pytest.approx(
        hf(get_linear_schedule_with_warmup)[3:], rel=1e-9
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr_scheduler": "step"}, "unknown --lr-scheduler 'step'; choose one of cosine, linear"),
        ({"min_lr": 1.0}, r"--min-lr must be in \[0, --lr 0.0001\]"),
        ({"warmup_ratio": 1.0}, r"--warmup-ratio must be in \[0, 1\)"),
        ({"warmup_ratio": 0.1, "warmup_steps": 5}, "give --warmup-steps or --warmup-ratio"),
        ({"decay_ratio": 0.0}, r"--decay-ratio must be in \(0, 1\]"),
        ({"attn_implementation": "flash"}, "unknown --attn-implementation 'flash'"),
        ({"num_workers": -1}, "--workers must be >= 0"),
    ],
)
def test_bad_flag_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(cache="c", student="s", out="o", **overrides)


def test_cli_refuses_a_bad_scheduler_in_one_line(tmp_path):
    from kdcache.cli.app import app

    result = CliRunner().invoke(app, ["train", "--cache", str(tmp_path), "--student", "s",
                                      "--out", str(tmp_path / "o"), "--lr-scheduler", "step"])  # fmt: skip
    assert result.exit_code == 2
    assert "error: unknown --lr-scheduler 'step'" in result.output
    assert not (tmp_path / "o").exists()


def test_old_run_json_resumes_with_the_new_fields(small_run, tmp_path):
    config = _config(small_run, tmp_path / "run")
    stored = config.to_dict()
    for name in ("lr_scheduler", "min_lr", "warmup_ratio", "decay_ratio", "attn_implementation",
                 "gradient_checkpointing", "compile"):  # fmt: skip
        stored.pop(name)
    stored["num_workers"] = 0  # the old default
    assert config.differences(stored) == []
    faster = _config(small_run, tmp_path / "run", gradient_checkpointing=True, compile=True,
                     attn_implementation="eager", num_workers=1)  # fmt: skip
    assert faster.differences(config.to_dict()) == []  # how it runs, not what: resumable
    other = _config(small_run, tmp_path / "run", lr_scheduler="wsd")
    assert other.differences(config.to_dict()) == ["lr_scheduler: 'cosine' -> 'wsd'"]


def test_a_run_with_the_flags_trains_and_logs_the_schedule(small_run, tmp_path, monkeypatch):
    from kdcache.cli.app import app
    from kdcache.trainer import chunked

    operands = set()
    gemm = chunked._gemm
    monkeypatch.setattr(chunked, "_gemm",
                        lambda a, b, out: operands.add((a.dtype, b.dtype)) or gemm(a, b, out))  # fmt: skip
    cache, student = small_run
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--cache", str(cache), "--student", str(student), "--out", str(out),
        "--steps", "6", "--batch-size", "2", "--lr", "1e-3", "--log-every", "1",
        "--no-progress", "--gradient-checkpointing", "--lr-scheduler", "linear",
        "--min-lr", "1e-4", "--warmup-ratio", "0.34", "--attn-implementation", "eager",
        "--dtype", "bfloat16",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").open() if '"train"' in x]
    # warmup ceil(0.34 * 6) = 3 steps; logged lr is the one after each step
    want = [1e-3 * (s + 1) / 3 for s in range(1, 3)] + [
        1e-4 + 9e-4 * (1 - (s - 3) / 3) for s in range(3, 7)
    ]
    assert [m["lr"] for m in lines] == pytest.approx(want, rel=1e-9)
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert operands == {(torch.bfloat16, torch.bfloat16)}  # --dtype bfloat16: the head in bf16
    run = json.loads((out / "run.json").read_text())
    assert run["gradient_checkpointing"] and run["lr_scheduler"] == "linear"
    assert Path(out / "final" / "config.json").is_file()
