"""Chunk-likelihood distillation across tokenizers (--xtok-loss alm): chunks, loss, gradient.

The dense references are written here by hand: the chunks of two hand-built tokenizations, the
student's full log-softmax summed over each chunk's tokens, the binarised KL of each chunk.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cache import open_cache
from kdcache.cache.errors import ConfigError
from kdcache.cache.extraction.heads import split_head
from kdcache.cache.records import SequenceRecord
from kdcache.cli.app import app
from kdcache.trainer.chunked import chunk_spans, chunked_head_loss
from kdcache.trainer.cross_tokenizer.alignment import CrossTokenizer
from kdcache.trainer.cross_tokenizer.batches import collate_student_records, student_record
from kdcache.trainer.cross_tokenizer.chunks import likelihood_chunks
from kdcache.trainer.cross_tokenizer.likelihood import (
    binary_kl,
)
from kdcache.trainer.cross_tokenizer.setup import cross_tokenizer_target
from kdcache.trainer.objective import DistillObjective
from kdcache.trainer.targets.base import LossOptions
from tests import train_helpers as helpers
from tests import xtok_helpers as hand
from tests.conftest import SPECIAL_TOKENS, stdlib_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# teacher: abc | Ġ | abc | <eos> | abc  (ids 5 3 5 6 5)  -> ends 3 4 7 8 11
# student: a bc | Ġ | a bc | <eos> | a bc                 -> ends 1 3 4 5 7 8 9 11
# common boundaries 3 4 7 8 11: chunks (3,4] (4,7] (7,8] (8,11]; the text before 3 holds the
# block's first token (no predicting position on either side): no chunk.
TEACHER_IDS = np.array([5, 3, 5, 6, 5])
# per chunk: (teacher positions whose observed log-probs add up, student positions)
CHUNKS_BY_HAND = [([0], [1]), ([1], [2, 3]), ([2], [4]), ([3], [5, 6])]


def _record(observed: np.ndarray, positions=None, top_k: int = 3) -> SequenceRecord:
    rng = np.random.default_rng(0)
    positions = np.arange(len(TEACHER_IDS)) if positions is None else np.asarray(positions)
    rows = len(positions)
    ids = np.stack([rng.permutation(7)[:top_k] for _ in range(rows)]).astype(np.int32)
    probs = rng.dirichlet(np.ones(top_k + 1), size=rows)
    logprobs = np.log(-np.sort(-probs[:, :top_k], axis=1)).astype(np.float32)
    return SequenceRecord(
        sequence_id=0,
        input_ids=TEACHER_IDS.astype(np.int32),
        topk_ids=ids,
        topk_logprobs=logprobs,
        tail_mass=probs[:, top_k].astype(np.float32),
        positions=positions.astype(np.int32),
        observed_logprobs=np.asarray(observed, np.float32),
    )


def _cross(xtok_loss: str = "alm") -> CrossTokenizer:
    return CrossTokenizer(hand.teacher_tokenizer(), hand.student_tokenizer(), xtok_loss=xtok_loss)


def test_chunks_by_hand():
    observed = np.array([-1.0, -2.0, -3.0, -4.0, np.nan])
    aligned = _cross().align(TEACHER_IDS, np.arange(5))
    found = likelihood_chunks(aligned.ends, aligned.reproduced, aligned.teacher_ends,
                              np.arange(5), observed)  # fmt: skip
    # position p predicts student token p + 1: token 1 (bc) is before the first boundary
    assert found.chunk.tolist() == [-1, 0, 1, 1, 2, 3, 3, -1]
    np.testing.assert_allclose(found.teacher_ll, [-1.0, -2.0, -3.0, -4.0])


def test_a_chunk_needs_every_teacher_position_stored_and_known():
    # chat-like: only teacher positions 2 and 4 stored (rows 0 and 1): only chunk (7,8] (its
    # token <eos> is predicted by position 2) has all its teacher log-probs
    aligned = _cross().align(TEACHER_IDS, np.array([2, 4]))
    found = likelihood_chunks(aligned.ends, aligned.reproduced, aligned.teacher_ends,
                              np.array([2, 4]), np.array([-0.5, np.nan]))  # fmt: skip
    assert found.chunk.tolist() == [-1, -1, -1, -1, 0, -1, -1, -1]
    np.testing.assert_allclose(found.teacher_ll, [-0.5])
    # an unknown observed log-prob (NaN) drops its chunk
    observed = np.array([-1.0, np.nan, -3.0, -4.0, np.nan])
    found = likelihood_chunks(aligned.ends, aligned.reproduced, aligned.teacher_ends,
                              np.arange(5), observed)  # fmt: skip
    assert found.chunk.tolist() == [-1, 0, -1, -1, 1, 2, 2, -1]


def _hand_loss(logits: torch.Tensor, student_ids, observed, tau: float, temperature: float):
    """sum over the hand chunks of the binarised KL, from the full log-softmax (float64)."""
    log_q = torch.log_softmax(logits.double() / temperature, dim=-1)  # (S, V)
    total = logits.new_zeros((), dtype=torch.float64)
    for teacher_positions, student_positions in CHUNKS_BY_HAND:
        a = float(sum(observed[j] for j in teacher_positions)) / tau - 1e-6
        b = sum(log_q[p, student_ids[p + 1]] for p in student_positions) / tau - 1e-6
        p_chunk, q_chunk = math.exp(a), torch.exp(b)
        total = total + tau * (
            p_chunk * (a - b) + (1 - p_chunk) * (math.log1p(-p_chunk) - torch.log1p(-q_chunk))
        )
    return total


@pytest.mark.parametrize(("tau", "temperature"), [(100.0, 1.0), (1.0, 2.0), (10.0, 0.7)])
def test_loss_and_gradient_against_the_dense_reference(tau, temperature):
    observed = np.array([-1.5, -6.0, -0.2, -3.0, np.nan])
    cross = _cross("alm")
    converted = student_record(_record(observed), cross)
    batch = collate_student_records([converted], xtok_loss="alm")
    target = cross_tokenizer_target(cross, helpers.tiny_llama(6), uld_weight=0.0,
                                    alm_binarization=tau)  # fmt: skip
    rows = torch.arange(converted.num_tokens)
    teacher_rows = target.select(batch, rows, 6)
    torch.manual_seed(0)
    logits = (torch.randn(converted.num_tokens, 6) * 2).requires_grad_()
    reference = _hand_loss(logits, converted.input_ids, observed, tau, temperature)
    reference.backward()
    options = LossOptions(kind="fkl", temperature=temperature)
    per_row = target.loss(logits.detach(), teacher_rows, options)
    torch.testing.assert_close(per_row.sum().double(), reference.detach(), rtol=1e-5, atol=1e-6)
    weight = torch.full((converted.num_tokens,), 0.5)
    loss, grad = target.loss_and_grad(logits.detach(), teacher_rows, weight, options)
    torch.testing.assert_close(loss.sum().double(), 0.5 * reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, 0.5 * logits.grad, rtol=1e-4, atol=1e-6)
    # the positions outside every chunk get nothing
    assert grad[[0, 7]].abs().max() == 0


def test_binary_kl_slope_and_its_large_tau_limit():
    teacher = torch.tensor([-0.5, -3.0, -8.0], dtype=torch.float64)
    student = torch.tensor([-2.0, -3.0, -1.0], dtype=torch.float64, requires_grad=True)
    value, slope = binary_kl(teacher, student, 10.0)
    (autograd,) = torch.autograd.grad(value.sum(), student)
    torch.testing.assert_close(slope, autograd)
    assert value[1].abs() < 1e-9 and slope[1].abs() < 1e-9  # equal likelihoods: no loss, no push
    # tau -> inf: D -> B - A - A log(B / A), slope -> A / B - 1 (A, B the two NLLs, each
    # with eps * tau added)
    value, slope = binary_kl(teacher, student.detach(), 1e5)
    a, b = 0.1 - teacher, 0.1 - student.detach()
    torch.testing.assert_close(value, b - a - a * torch.log(b / a), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(slope, a / b - 1, rtol=1e-3, atol=1e-3)


def test_chunk_spans_never_split_a_group():
    groups = torch.tensor([-1, 0, 0, 0, 1, 1, -1, 2, 3, 3, 3, 3, -1])
    for size in (1, 2, 3, 5, 100):
        spans = chunk_spans(len(groups), size, groups)
        assert spans[0][0] == 0 and spans[-1][1] == len(groups)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end == start
            assert groups[start] < 0 or groups[start] != groups[start - 1]
    assert chunk_spans(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_fused_head_equals_full_logits_with_chunks_across_head_chunks():
    observed = np.array([-1.5, -6.0, -0.2, -3.0, np.nan])
    cross = _cross("alm")
    converted = student_record(_record(observed), cross)
    batch = collate_student_records([converted], xtok_loss="alm")
    model = helpers.tiny_llama(6)
    target = cross_tokenizer_target(cross, model, uld_weight=0.0, alm_binarization=10.0)
    rows = torch.arange(converted.num_tokens)
    teacher_rows = target.select(batch, rows, 6)
    weight = torch.rand(converted.num_tokens)
    torch.manual_seed(1)
    hidden = torch.randn(converted.num_tokens, 16, requires_grad=True)
    head = split_head(model)
    options = LossOptions(kind="fkl", temperature=1.0)

    def kernel(logits, start, end):
        chunk = {name: value[start:end] for name, value in teacher_rows.items()}
        return target.loss_and_grad(logits, chunk, weight[start:end], options)

    results = []
    for size, method in ((1, "fused"), (2, "fused"), (100, "plain")):
        hidden.grad = None
        model.zero_grad()
        loss = chunked_head_loss(hidden, head, kernel, chunk_size=size, method=method,
                                 groups=target.row_groups(teacher_rows))  # fmt: skip
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for other in results[:2]:
        for got, want in zip(other, results[2], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    return helpers.make_cache(tmp_path_factory.mktemp("cache"), tiny_llama_dir,
                              helpers.read_texts(text_jsonl), num_train=6, num_holdout=2)  # fmt: skip


@pytest.fixture(scope="module")
def other_student(tmp_path_factory) -> Path:
    """A config-only student with its own byte-level BPE (300 tokens) trained on other text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS[::-1],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    bpe.train_from_iterator(stdlib_corpus()[4:], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        pad_token="<|pad|>")  # fmt: skip
    directory = tmp_path_factory.mktemp("bpe-student")
    tokenizer.save_pretrained(directory)
    config = helpers.student_config(directory / "c.json", tokenizer)
    values = json.loads(config.read_text())
    (directory / "config.json").write_text(json.dumps({**values, "max_position_embeddings": 256}))
    config.unlink()
    return directory


@pytest.fixture(scope="module")
def old_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    """A cache without the observed column (format 1 / --no-observed-logprobs)."""
    return helpers.make_cache(tmp_path_factory.mktemp("old-cache"), tiny_llama_dir,
                              helpers.read_texts(text_jsonl), num_train=4, num_holdout=2,
                              observed=False)  # fmt: skip


@pytest.mark.parametrize("xtok_loss", ["alm", "alm+exact"])
def test_objective_chunked_equals_the_full_forward(small_cache, other_student, xtok_loss):
    from transformers import AutoTokenizer

    from kdcache.trainer.cross_tokenizer.setup import cross_tokenizer_for

    cross = cross_tokenizer_for(open_cache(small_cache), AutoTokenizer.from_pretrained(other_student),
                                xtok_loss=xtok_loss)  # fmt: skip
    records = [student_record(r, cross) for r in list(open_cache(small_cache).sequences())[:3]]
    batch = collate_student_records(records, xtok_loss=xtok_loss)
    assert (batch["alm_chunk"] >= 0).float().mean() > 0.5  # most positions are in a chunk
    model = helpers.tiny_llama(len(AutoTokenizer.from_pretrained(other_student)))
    counts = (float(batch["distill_mask"].sum()), float((batch["labels"] != -100).sum()))
    results = []
    for chunked in (True, False):
        target = cross_tokenizer_target(cross, model, uld_weight=0.5, alm_binarization=20.0)
        objective = DistillObjective(model, target, LossOptions(kind="fkl", temperature=2.0),
                                     alpha=0.3, chunk_size=5, chunked=chunked)  # fmt: skip
        model.zero_grad()
        loss = objective(batch, *counts)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for fused, plain in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-6)


def test_a_cache_without_observed_logprobs_is_refused_in_one_line(old_cache, other_student):
    from transformers import AutoTokenizer

    from kdcache.trainer.cross_tokenizer.setup import cross_tokenizer_for

    record = next(iter(open_cache(old_cache).sequences()))
    assert record.observed_logprobs is None  # still readable
    with pytest.raises(ConfigError, match=r"no observed-token log-probs.*rebuild") as error:
        cross_tokenizer_for(open_cache(old_cache), AutoTokenizer.from_pretrained(other_student),
                            xtok_loss="alm")  # fmt: skip
    assert "\n" not in str(error.value)


def test_cli_trains_with_alm(tmp_path, small_cache, other_student, old_cache):
    base = ["train", "--cache", str(small_cache), "--student", str(other_student), "--steps", "2",
            "--batch-size", "2", "--no-progress", "--cross-tokenizer", "--ce-weight", "0"]  # fmt: skip
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "run"), "--xtok-loss", "alm"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [line for line in lines if line["kind"] == "train"]
    assert train[-1]["chunk_fraction"] > 0.5 and math.isfinite(train[-1]["loss"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["xtok_loss"] == "alm"
    refused = CliRunner().invoke(app, [*base[:2], str(old_cache), *base[3:], "--out",
                                       str(tmp_path / "old"), "--xtok-loss", "alm"])  # fmt: skip
    assert refused.exit_code != 0
    assert "no observed-token log-probs" in refused.output
    wrong = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "w"), "--xtok-loss", "chunks"])
    assert wrong.exit_code != 0 and "--xtok-loss must be one of" in wrong.output


def test_cross_tokenizer_defaults(tmp_path, small_cache, other_student, old_cache):
    """A plain --cross-tokenizer (docs/QUALITY.md, issue 26) trains the setting measured best as
    pure KD: chunk likelihoods + exact-match FKL, prefix map, no ULD, no CE; on a cache without
    observed log-probs the exact-match target's defaults (AKL + ULD, exact map, 0.5 CE), said in
    one line; an explicit --xtok-loss exact gets those too; an option given always wins."""
    base = ["train", "--student", str(other_student), "--steps", "1", "--batch-size", "2",
            "--no-progress", "--cross-tokenizer"]  # fmt: skip
    names = ("xtok_loss", "loss", "uld_weight", "vocab_map", "ce_weight")

    def stored(cache, out, *extra):
        result = CliRunner().invoke(app, [*base, "--cache", str(cache), "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        run = json.loads((out / "run.json").read_text())
        return tuple(run[name] for name in names), result.output

    best = ("alm+exact", "fkl", 0.0, "prefix", 0.0)
    assert stored(small_cache, tmp_path / "new")[0] == best
    exact = ("exact", "akl", 1.0, "exact", 0.5)
    settings, output = stored(old_cache, tmp_path / "old")
    assert settings == exact
    note = [line for line in output.splitlines() if "no observed-token log-probs" in line]
    assert len(note) == 1 and "rebuild" in note[0]
    assert stored(small_cache, tmp_path / "exact", "--xtok-loss", "exact")[0] == exact
    mixed, _ = stored(small_cache, tmp_path / "mix", "--ce-weight", "0.25", "--loss", "akl")
    assert mixed == ("alm+exact", "akl", 0.0, "prefix", 0.25)
    # no --cross-tokenizer: TrainConfig's defaults, so a same-tokenizer run is unchanged
    plain = CliRunner().invoke(app, ["train", "--cache", str(small_cache), "--student",
                                     str(other_student), "--out", str(tmp_path / "plain")])  # fmt: skip
    assert plain.exit_code != 0 and "pass --cross-tokenizer" in plain.output
