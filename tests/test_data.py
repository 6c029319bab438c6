"""The build's record stream: loading, holdout, packing, chat masks, rank slices (hand-checked)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache.cache.build.data import (
    DataSpec,
    RecordStream,
    group_of,
    is_holdout,
    owned_groups,
    render_chat,
    resolve_group_rows,
)
from kdcache.cache.errors import ConfigError
from tests.conftest import chat_rows, make_tokenizer, text_rows, write_jsonl


def _docs(tokenizer, rows):
    return [np.asarray(tokenizer(r["text"])["input_ids"], dtype=np.int32) for r in rows]


def test_pack_concatenates_documents_with_eos(tiny_tokenizer, text_jsonl):
    spec = DataSpec(str(text_jsonl), max_length=64, holdout=0.0)
    sequences = list(RecordStream(spec, tiny_tokenizer).sequences("train"))
    eos = tiny_tokenizer.eos_token_id
    expected = np.concatenate([np.append(d, eos) for d in _docs(tiny_tokenizer, text_rows())])
    np.testing.assert_array_equal(np.concatenate([s.input_ids for s in sequences]), expected)
    assert all(len(s.input_ids) == 64 for s in sequences[:-1])
    assert [s.sequence_id for s in sequences] == list(range(len(sequences)))
    for s in sequences:
        np.testing.assert_array_equal(s.positions, np.arange(len(s.input_ids)))


def test_no_pack_truncates_each_row(tiny_tokenizer, text_jsonl):
    spec = DataSpec(str(text_jsonl), max_length=40, pack=False, holdout=0.0, limit=10)
    sequences = list(RecordStream(spec, tiny_tokenizer).sequences("train"))
    docs = _docs(tiny_tokenizer, text_rows()[:10])
    assert len(sequences) == 10
    for s, doc in zip(sequences, docs, strict=True):
        np.testing.assert_array_equal(s.input_ids, doc[:40])


def test_holdout_is_deterministic_disjoint_and_stable_under_limit(tiny_tokenizer, tmp_path):
    rows = text_rows(60, seed=3)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    spec = DataSpec(str(path), pack=False, holdout=0.3)
    stream = RecordStream(spec, tiny_tokenizer)
    train = [s.input_ids.tolist() for s in stream.sequences("train")]
    holdout = [s.input_ids.tolist() for s in stream.sequences("holdout")]
    assert len(train) + len(holdout) == 60 and 5 < len(holdout) < 35
    expected = [r for r in rows if is_holdout(r["text"], 0.3)]
    assert holdout == [d.tolist()[:1024] for d in _docs(tiny_tokenizer, expected)]
    limited = RecordStream(DataSpec(str(path), pack=False, holdout=0.3, limit=30), tiny_tokenizer)
    expected_limited = [r for r in rows[:30] if is_holdout(r["text"], 0.3)]
    assert [s.input_ids.tolist() for s in limited.sequences("holdout")] == [
        d.tolist() for d in _docs(tiny_tokenizer, expected_limited)
    ]


def test_rank_slices_are_disjoint_and_cover(tiny_tokenizer, text_jsonl):
    stream = RecordStream(DataSpec(str(text_jsonl), max_length=32, holdout=0.0), tiny_tokenizer)
    whole = [s.sequence_id for s in stream.sequences("train")]
    parts = [[s.sequence_id for s in stream.sequences("train", r, 3)] for r in range(3)]
    assert sorted(i for part in parts for i in part) == whole


def test_auto_group_rows_give_about_64_groups_of_256_to_1024_rows():
    assert [resolve_group_rows("auto", n) for n in (1, 16, 256, 6400, 20000, 10**5, 10**7)] == [
        1, 16, 256, 256, 313, 1024, 1024,
    ]  # fmt: skip
    assert resolve_group_rows(7, 10**7) == 7


def test_row_groups_partition_rows_and_tokenize_only_owned_rows(tiny_tokenizer, text_jsonl):
    """Ranks own row groups g % W == r; each tokenizes only its groups' rows; packing restarts at
    a group, so a group's sequences equal a stream of that group's rows alone."""
    spec = DataSpec(str(text_jsonl), max_length=32, holdout=0.3, group_rows=3)
    reference = RecordStream(spec, tiny_tokenizer)
    rows = len(reference.rows)
    assert reference.num_groups == -(-rows // 3) and reference.num_groups >= 3
    for world in (2, 3):
        streams = [RecordStream(spec, tiny_tokenizer) for _ in range(world)]
        for split in ("train", "holdout"):
            parts = [list(s.sequences(split, r, world)) for r, s in enumerate(streams)]
            for r, part in enumerate(parts):
                assert all(group_of(q.sequence_id) % world == r for q in part)
            got = sorted((q.sequence_id, q.input_ids.tobytes()) for p in parts for q in p)
            whole = sorted(
                (q.sequence_id, q.input_ids.tobytes()) for q in reference.sequences(split)
            )
            assert got == whole
        assert [s.tokenized_rows for s in streams] == [
            sum(min(3, rows - 3 * g) for g in owned_groups(reference.num_groups, r, world))
            for r in range(world)
        ]
    # a group's sequences are those of its rows alone (ids: group << 32 | n)
    alone = RecordStream(spec, tiny_tokenizer, rows=reference.rows.select(range(3, 6)))
    expected = [q.input_ids.tolist() for q in alone.group_sequences("train", 0)]
    got = list(reference.group_sequences("train", 1))
    assert [q.input_ids.tolist() for q in got] == expected
    assert [q.sequence_id for q in got] == [(1 << 32) + n for n in range(len(got))]


def test_local_formats_and_directories(tiny_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["def f(x):\n    return x", "import os\nprint(os.sep)", "class A:\n    pass"]
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n".join(t.replace("\n", " ") for t in texts))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, t in enumerate(texts):
        write_jsonl(folder / f"part{i}.jsonl", [{"text": t}])
    parquet = RecordStream(
        DataSpec(str(tmp_path / "d.parquet"), text_field="body", pack=False, holdout=0),
        tiny_tokenizer,
    )
    assert [s.input_ids.tolist() for s in parquet.sequences("train")] == [
        tiny_tokenizer(t)["input_ids"] for t in texts
    ]
    text = RecordStream(DataSpec(str(tmp_path / "d.txt"), pack=False, holdout=0), tiny_tokenizer)
    assert len(list(text.sequences("train"))) == 3
    directory = RecordStream(DataSpec(str(folder), pack=False, holdout=0), tiny_tokenizer)
    assert [s.input_ids.tolist() for s in directory.sequences("train")] == [
        tiny_tokenizer(t)["input_ids"] for t in texts
    ]


def test_chat_positions_predict_exactly_the_assistant_tokens(tiny_tokenizer, chat_jsonl):
    messages = chat_rows(1)[0]["messages"]
    ids, assistant = render_chat(tiny_tokenizer, messages)
    decoded = tiny_tokenizer.decode(ids[assistant])
    assert (
        decoded
        == "Use sorted(items) or items.sort() (0).<|im_end|>\nPass reverse=True.<|im_end|>\n"
    )
    spec = DataSpec(str(chat_jsonl), messages_field="messages", pack=False, holdout=0)
    first = next(RecordStream(spec, tiny_tokenizer).sequences("train"))
    np.testing.assert_array_equal(first.input_ids, ids)
    np.testing.assert_array_equal(first.positions, np.flatnonzero(assistant) - 1)
    packed = RecordStream(
        DataSpec(str(chat_jsonl), messages_field="messages", max_length=48, holdout=0),
        tiny_tokenizer,
    )
    for s in packed.sequences("train"):
        assert len(s.input_ids) <= 48 and s.positions.max() < len(s.input_ids) - 1


def test_bad_data_is_refused(tiny_tokenizer, tmp_path, text_jsonl, chat_jsonl):
    with pytest.raises(ConfigError, match="has no field 'body'"):
        RecordStream(DataSpec(str(text_jsonl), text_field="body"), tiny_tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        RecordStream(DataSpec(str(empty)), tiny_tokenizer)
    with pytest.raises(ConfigError, match="does not exist"):
        RecordStream(DataSpec(str(tmp_path / "missing.jsonl")), tiny_tokenizer)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ConfigError, match="unsupported data file"):
        RecordStream(DataSpec(str(tmp_path / "x.xml")), tiny_tokenizer)
    no_template = make_tokenizer(tmp_path / "tok", chat_template=None)
    with pytest.raises(ConfigError, match="needs a chat template"):
        RecordStream(DataSpec(str(chat_jsonl), messages_field="messages"), no_template)
    bad_chat = write_jsonl(tmp_path / "bad.jsonl", [{"messages": json.dumps([{"x": 1}])}])
    with pytest.raises(ConfigError, match="chat rows must be lists"):
        list(
            RecordStream(
                DataSpec(str(bad_chat), messages_field="messages"), tiny_tokenizer
            ).sequences("train")
        )


GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_generation_tags_use_the_tokenizers_assistant_mask(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok", chat_template=GENERATION_TEMPLATE)
    ids, assistant = render_chat(tokenizer, chat_rows(1)[0]["messages"])
    assert tokenizer.decode(ids[assistant]) == (
        "Use sorted(items) or items.sort() (0).<|im_end|>Pass reverse=True.<|im_end|>"
    )
