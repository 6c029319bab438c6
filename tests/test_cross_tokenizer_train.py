"""Training across tokenizers: the student batches, the objective's fast path, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cache import open_cache
from kdcache.cache.errors import ConfigError
from kdcache.cli.app import app
from kdcache.trainer.cross_tokenizer.alignment import CrossTokenizer
from kdcache.trainer.cross_tokenizer.batches import collate_student_records, student_record
from kdcache.trainer.cross_tokenizer.setup import cross_tokenizer_target
from kdcache.trainer.objective import DistillObjective
from kdcache.trainer.student import check_tokenizer
from kdcache.trainer.targets.base import LossOptions
from tests import train_helpers as helpers
from tests.conftest import SPECIAL_TOKENS, stdlib_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    return helpers.make_cache(tmp_path_factory.mktemp("cache"), tiny_llama_dir,
                              helpers.read_texts(text_jsonl), num_train=8, num_holdout=4,
                              temperature=2.0)  # fmt: skip


@pytest.fixture(scope="module")
def other_student(tmp_path_factory, tiny_tokenizer) -> Path:
    """A config-only student with its own byte-level BPE (300 tokens, other merges and ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS[::-1],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    bpe.train_from_iterator(stdlib_corpus()[4:], trainer=trainer)  # other text: other merges
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        pad_token="<|pad|>")  # fmt: skip
    directory = tmp_path_factory.mktemp("other-student")
    tokenizer.save_pretrained(directory)
    config = helpers.student_config(directory / "c.json", tokenizer)
    values = json.loads(config.read_text())
    (directory / "config.json").write_text(json.dumps({**values, "max_position_embeddings": 256}))
    config.unlink()
    return directory


def _cross(cache_dir: Path, student_dir: Path) -> CrossTokenizer:
    from transformers import AutoTokenizer

    return CrossTokenizer(AutoTokenizer.from_pretrained(cache_dir / "tokenizer"),
                          AutoTokenizer.from_pretrained(student_dir))  # fmt: skip


def test_student_records_are_the_student_tokenization_of_the_same_text(small_cache, other_student):
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(small_cache / "tokenizer")
    student = AutoTokenizer.from_pretrained(other_student)
    cross = _cross(small_cache, other_student)
    aligned_total = positions_total = 0
    for record in open_cache(small_cache).sequences("train"):
        converted = student_record(record, cross)
        text = teacher.decode(record.input_ids)  # the reference: the tokenizers' own decode
        assert student.decode(converted.input_ids) == text
        assert int(converted.token_bytes.sum()) == len(text.encode()) - text.count(
            "<|endoftext|>"
        ) * (len("<|endoftext|>") - 1)  # fmt: skip  (a special is 1 unit)
        # each distilled row's teacher row: the teacher read exactly the same text before it
        aligned = cross.align(record.input_ids, record.positions)
        boundary = converted.positions[~converted.inside]
        for position, row in zip(boundary, aligned.teacher_rows, strict=True):
            before_student = student.decode(converted.input_ids[: position + 1])
            before_teacher = teacher.decode(record.input_ids[: record.positions[row] + 1])
            assert before_student == before_teacher
        # an inside position: the teacher's text up to its enclosing position + the emitted bytes
        for position, row, emitted in zip(aligned.inside_positions, aligned.inside_rows,
                                          aligned.inside_emitted, strict=True):  # fmt: skip
            before_student = student.decode(converted.input_ids[: position + 1]).encode()
            before_teacher = teacher.decode(record.input_ids[: record.positions[row] + 1])
            assert before_student == before_teacher.encode() + emitted
        aligned_total += len(boundary)
        positions_total += converted.num_tokens
    assert 0.3 < aligned_total / positions_total < 1.0  # different merges: some, not all


def test_collated_batch_has_ce_everywhere_and_kd_at_aligned_positions(small_cache, other_student):
    cross = _cross(small_cache, other_student)
    records = [student_record(r, cross) for r in list(open_cache(small_cache).sequences())[:3]]
    batch = collate_student_records(records)
    for row, record in enumerate(records):
        size = record.num_tokens
        assert batch["labels"][row, : size - 1].tolist() == record.input_ids[1:].tolist()
        assert (batch["labels"][row, size - 1 :] == -100).all()
        assert batch["distill_mask"][row].nonzero()[:, 0].tolist() == record.positions.tolist()
    # mapping moves mass between the top-k and the bucket, never loses any: the total is the
    # cached row's own (stored values are rounded, so not exactly 1)
    cache_rows = [r for r in list(open_cache(small_cache).sequences())[:3]]
    for row, (record, cached) in enumerate(zip(records, cache_rows, strict=True)):
        teacher_rows = cross.align(cached.input_ids, cached.positions).teacher_rows
        want = np.exp(cached.topk_logprobs[teacher_rows]).sum(-1) + cached.tail_mass[teacher_rows]
        got = batch["topk_logprobs"][row].exp().sum(-1) + batch["tail_mass"][row]
        np.testing.assert_allclose(got[record.positions[~record.inside]].numpy(), want, rtol=1e-5)
        # an inside row is a conditional distribution: its top-k and bucket add up to 1
        inside = record.positions[record.inside]
        np.testing.assert_allclose(got[inside].numpy(), 1.0, rtol=1e-5)


def test_chunked_objective_equals_the_full_forward(small_cache, other_student):
    from transformers import AutoTokenizer

    cross = _cross(small_cache, other_student)
    records = [student_record(r, cross) for r in list(open_cache(small_cache).sequences())[:4]]
    batch = collate_student_records(records)
    model = helpers.tiny_llama(len(AutoTokenizer.from_pretrained(other_student)) + 4)  # padded
    counts = (float(batch["distill_mask"].sum()), float((batch["labels"] != -100).sum()))
    grads = []
    for chunked in (True, False):
        target = cross_tokenizer_target(cross, model, uld_weight=0.5)
        options = LossOptions(kind="akl", temperature=2.0)
        objective = DistillObjective(
            model, target, options, alpha=0.3, chunk_size=7, chunked=chunked
        )
        model.zero_grad()
        loss = objective(batch, *counts)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for fused, plain in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-6)


def _train(cache: Path, student: Path, out: Path, *extra: str):
    args = ["train", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--no-progress", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory, small_cache, other_student):
    """A 3-step cross-tokenizer run through the CLI: (CliRunner result, run directory)."""
    run = tmp_path_factory.mktemp("xtok-run") / "run"
    result = _train(small_cache, other_student, run, "--cross-tokenizer", "--ce-weight", "0.5",
                    "--log-every", "1")  # fmt: skip
    return result, run


def test_cli_trains_across_tokenizers(cross_run):
    result, run = cross_run
    assert result.exit_code == 0, result.output
    assert "note: cross-tokenizer:" in result.stderr
    assert "of student positions aligned" in result.stdout
    lines = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    train_lines = [line for line in lines if line["kind"] == "train"]
    assert len(train_lines) == 3 and all(np.isfinite(line["loss"]) for line in train_lines)
    assert 0.0 < train_lines[-1]["aligned_fraction"] < 1.0
    assert 0.0 < train_lines[-1]["matched_mass"] <= 1.0
    assert (run / "final" / "config.json").is_file()


def test_cross_tokenizer_resume_with_another_worker_count_is_exact(
    tmp_path, small_cache, other_student
):
    """A cross-tokenizer run resumed from its step-2 checkpoint (with a DataLoader worker now)
    ends with the weights of the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    run = tmp_path / "run"
    flags = ["--cross-tokenizer", "--ce-weight", "0.5", "--steps", "4", "--save-every", "2"]
    flags += ["--batch-size", "2"]  # overrides _train's 4: 4 batches per epoch, resume mid-epoch
    first = _train(small_cache, other_student, run, *flags)
    assert first.exit_code == 0, first.output
    expected = load_file(run / "final" / "model.safetensors")
    for name in ("final", "step-4"):
        shutil.rmtree(run / name, ignore_errors=True)
    again = _train(small_cache, other_student, run, *flags, "--resume", "--workers", "1")
    assert again.exit_code == 0, again.output
    got = load_file(run / "final" / "model.safetensors")
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=0, atol=1e-6, msg=name)


def test_eval_reports_bits_per_byte_for_both_kinds_of_student(tmp_path, small_cache, cross_run,
                                                             tiny_llama_dir):  # fmt: skip
    _, run = cross_run
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", "--cache", str(small_cache), "--student",
                                      str(tiny_llama_dir), "--student", str(run / "final"),
                                      "--cross-tokenizer", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["students"]
    same, cross = report[str(tiny_llama_dir)], report[str(run / "final")]
    assert {"ce", "bpb", "fkl_bucket", "top1"} <= set(same) and same["fkl_bucket"] is not None
    assert cross["fkl_bucket"] is None and cross["top1"] is None  # teacher tokens: n/a
    for metrics in (same, cross):  # the same held-out bytes, each student on its own tokens
        assert metrics["bpb"] == pytest.approx(
            metrics["ce"] * metrics["tokens"] / metrics["bytes"] / np.log(2), rel=1e-6
        )
    assert cross["bytes"] == pytest.approx(same["bytes"], rel=0.05)
    table_line = next(line for line in result.stdout.splitlines() if line.startswith("FKL"))
    assert table_line.rstrip().endswith("n/a")


def test_bits_per_byte_against_the_models_own_forward(small_cache, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcache.trainer.cross_tokenizer.bits_per_byte import bits_per_byte

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    texts = ["def f(x):\n    return x\n", "import os\nprint(os.sep)\n", "a = [1, 2, 3]\n"]
    sequences = []
    nats = predicted_bytes = 0.0
    for text in texts:
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
        lengths = np.array(
            [len(tokenizer.decode(ids[i : i + 1]).encode()) for i in range(len(ids))]
        )
        sequences.append((ids, lengths))
        with torch.no_grad():  # reference: one sequence at a time, no padding
            logits = model(torch.from_numpy(ids)[None]).logits[0, :-1]
        nats += float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids[1:]),
                                                        reduction="sum"))  # fmt: skip
        predicted_bytes += len(tokenizer.decode(ids[1:]).encode())
    result = bits_per_byte(model, sequences, batch_size=2)  # padded batches
    assert result["bpb"] == pytest.approx(nats / np.log(2) / predicted_bytes, rel=1e-5)
    assert result["bytes"] == predicted_bytes


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ([], "pass --cross-tokenizer"),
        (["--uld-weight", "0.5"], "--uld-weight needs --cross-tokenizer"),
        (["--cross-tokenizer", "--uld-weight", "-1"], "--uld-weight must be a number >= 0"),
        (["--vocab-map", "exact"], "--vocab-map needs --cross-tokenizer"),
        (["--no-distill-inside"], "--no-distill-inside needs --cross-tokenizer"),
        (
            ["--cross-tokenizer", "--vocab-map", "nearest"],
            "--vocab-map must be one of exact, prefix",
        ),
        (["--cross-tokenizer", "--eval-every", "2"], "--eval-every is not available"),
        (["--cross-tokenizer", "--loss", "js"], "--cross-tokenizer trains with --loss fkl"),
    ],
)
def test_cli_refusals(tmp_path, small_cache, other_student, extra, fragment):
    result = _train(small_cache, other_student, tmp_path / "run", *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert not (tmp_path / "run").exists()


def test_same_tokenizer_with_rows_added_at_the_end_is_not_cross(tmp_path, small_cache):
    from transformers import AutoTokenizer

    extended = AutoTokenizer.from_pretrained(small_cache / "tokenizer")
    extended.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})  # id = len(teacher)
    manifest = open_cache(small_cache).manifest
    assert check_tokenizer(extended, small_cache, manifest) is True
    shifted = AutoTokenizer.from_pretrained(small_cache / "tokenizer")
    vocab = shifted.get_vocab()
    first = min(index for token, index in vocab.items() if index >= 10)
    with pytest.raises(ConfigError, match=rf"the first is id {first}"):
        check_tokenizer(_swap_two_ids(tmp_path, shifted, first), small_cache, manifest)


def _swap_two_ids(tmp_path: Path, tokenizer, first: int):
    """The same tokenizer with the strings of ids ``first`` and ``first + 1`` exchanged."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "swapped")
    path = tmp_path / "swapped" / "tokenizer.json"
    state = json.loads(path.read_text())
    vocab = state["model"]["vocab"]
    by_id = {index: token for token, index in vocab.items()}
    vocab[by_id[first]], vocab[by_id[first + 1]] = first + 1, first
    path.write_text(json.dumps(state))
    return AutoTokenizer.from_pretrained(tmp_path / "swapped")


def _stored_before_the_flags(config) -> dict:
    """A run.json as written before --vocab-map / --distill-inside existed."""
    stored = config.to_dict()
    del stored["vocab_map"], stored["distill_inside"]
    return stored


def test_resume_of_a_run_from_before_the_vocab_map_flags():
    from kdcache.trainer.config import TrainConfig

    # a same-tokenizer run: the cross-tokenizer fields change nothing, so nothing to refuse
    plain = TrainConfig(cache="c", student="s", out="o")
    assert plain.differences(_stored_before_the_flags(plain)) == []
    # a cross-tokenizer run of that version behaved as --vocab-map exact --no-distill-inside
    cross = TrainConfig(cache="c", student="s", out="o", cross_tokenizer=True)
    stored = _stored_before_the_flags(cross)
    assert cross.differences(stored) == [
        "vocab_map: 'exact' -> 'prefix'",
        "distill_inside: False -> True",
    ]
    same_as_then = TrainConfig(
        cache="c", student="s", out="o", cross_tokenizer=True, distill_inside=False,
        vocab_map="exact",
    )  # fmt: skip
    assert same_as_then.differences(stored) == []
    prefix = TrainConfig(
        cache="c", student="s", out="o", cross_tokenizer=True, distill_inside=False,
        vocab_map="prefix",
    )  # fmt: skip
    assert prefix.differences(stored) == ["vocab_map: 'exact' -> 'prefix'"]


def test_eval_reads_cross_tokenizer_from_the_students_run(tmp_path, small_cache, cross_run,
                                                          other_student):  # fmt: skip
    """The run.json above ``final/`` says --cross-tokenizer: eval needs no flag; without it, no."""
    _, run = cross_run
    with_flag, without = tmp_path / "flag.json", tmp_path / "run.json"
    for out, extra in ((with_flag, ["--cross-tokenizer"]), (without, [])):
        result = CliRunner().invoke(app, ["eval", "--cache", str(small_cache), "--student",
                                          str(run / "final"), "--json", str(out), *extra])  # fmt: skip
        assert result.exit_code == 0, result.output
    assert json.loads(without.read_text()) == json.loads(with_flag.read_text())
    # the same student weights with no run beside them: the flag is still needed
    bare = tmp_path / "bare"
    shutil.copytree(run / "final", bare)
    refused = CliRunner().invoke(app, ["eval", "--cache", str(small_cache), "--student", str(bare)])
    assert refused.exit_code == 2 and "pass --cross-tokenizer" in refused.stderr


def test_ce_with_another_tokenizer_is_explained_as_training_on_the_caches_text(
    tmp_path, small_cache, other_student
):
    refused = _train(small_cache, other_student, tmp_path / "refused", "--loss", "ce")
    assert refused.exit_code == 2
    assert "trains on the cache's text with the student's own tokenizer" in refused.stderr
    assert "not distillation" in refused.stderr
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    result = _train(small_cache, other_student, tmp_path / "ce", "--loss", "ce",
                    "--cross-tokenizer")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "training on the cache's text with the student's own tokenizer" in result.stderr
