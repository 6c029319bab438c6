"""The build's record stream: load a dataset, tokenize it, split off the holdout, pack, slice per rank.

Everything here is deterministic: the same settings give the same sequences with the same ids.

* Rows come from ``datasets.load_dataset`` (a hub id, or local jsonl/json/parquet/csv/txt files or
  a directory of them); ``limit`` keeps the first rows.
* A row goes to the ``holdout`` split when a hash of its content falls below ``holdout``; the split
  of a row never depends on its position, so it is stable under ``limit`` and reordering, and
  duplicated rows land on the same side.
* Text rows are tokenized with the tokenizer's own special tokens (a BOS if it adds one). Chat rows
  are rendered with the tokenizer's chat template; only positions that predict an assistant token
  are distilled (``positions``).
* ``pack``: the documents of a split are concatenated with EOS after each one and cut into blocks
  of ``max_length`` tokens (the last block may be shorter). Without ``pack`` each row is one
  sequence, truncated to ``max_length``.
* Row groups: the rows are cut into groups of ``group_rows`` consecutive rows (the last may be
  smaller; ``"auto"``: ``resolve_group_rows``), the unit of work of a build. Packing runs inside a group (a group's last block may be
  shorter), so a group's sequences depend on its own rows only: a rank or an independent slice
  tokenizes exactly the rows of the groups it owns (``g % world_size == rank``), and the records
  are the same whatever the number of processes. Sequence ids are ``group << 32 | n``, ``n``
  counting the group's sequences of one split from 0 (a dataset of one group: 0, 1, 2 ...).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.cache.errors import ConfigError

SPLITS = ("train", "holdout")
LOCAL_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
_TOKENIZE_BATCH = 256
DEFAULT_GROUP_ROWS = 1024  # DataSpec's rows per group (the build's default is "auto")
AUTO_GROUPS = 64  # --group-rows auto: about this many groups, of 1 to MAX_AUTO_GROUP_ROWS rows
MAX_AUTO_GROUP_ROWS = 1024
# --group-rows auto never cuts fewer than this many rows into groups: a group ends its packing (a
# short last block) and writes shards of its own, and groups of a few rows gave a demo-sized cache
# dozens of tiny shards, which the trainer's shuffle windows (in shards) then mixed poorly (the
# demo's AKL student: held-out CE 5.91 with ~64 groups vs 5.68 with one, same teacher and data).
MIN_AUTO_GROUP_ROWS = 256
GROUP_ID_SHIFT = 32  # sequence_id = group << GROUP_ID_SHIFT | index in the group's split
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class DataSpec:
    """What the record stream is made of (the data part of ``BuildConfig``)."""

    data: str  # hub dataset id, local file or directory of files
    split: str = "train"  # dataset split to read
    data_config: str | None = None  # dataset configuration name (hub datasets)
    text_field: str = "text"
    messages_field: str | None = None  # chat rows: a list of {"role", "content"} dicts
    max_length: int = 1024
    pack: bool = True
    limit: int | None = None  # first rows only
    holdout: float = 0.01  # fraction of rows in the "holdout" split
    group_rows: int | str = DEFAULT_GROUP_ROWS  # rows per group ("auto": resolve_group_rows)


@dataclass
class SequenceInput:
    """One sequence to run the teacher on."""

    sequence_id: int  # index in its split's stream
    input_ids: np.ndarray  # (T,) int32
    positions: np.ndarray  # (M,) int32, positions whose next-token distribution is stored


def resolve_group_rows(group_rows: int | str, num_rows: int) -> int:
    """Rows per row group: ``group_rows``, or for ``"auto"`` ``ceil(num_rows / AUTO_GROUPS)``
    clamped to [``MIN_AUTO_GROUP_ROWS``, ``MAX_AUTO_GROUP_ROWS``] and to the row count (a
    dataset under 256 rows is one group; a big one gets groups of 1,024 rows). A pure function of the row count: every process agrees."""
    if group_rows == "auto":
        rows = max(MIN_AUTO_GROUP_ROWS, min(MAX_AUTO_GROUP_ROWS, -(-num_rows // AUTO_GROUPS)))
        return max(1, min(num_rows, rows))
    return int(group_rows)


def owned_groups(num_groups: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The groups of rank ``rank`` of ``world_size``: ``g % world_size == rank``, in order."""
    return list(range(rank, num_groups, world_size))


def group_of(sequence_id: int) -> int:
    """The row group a sequence id belongs to."""
    return int(sequence_id) >> GROUP_ID_SHIFT


def local_data_files(data: str) -> tuple[str, list[str]] | None:
    """``(builder, files)`` for a local file or directory, None when ``data`` is not a local path."""
    path = Path(data).expanduser()
    if not path.exists():
        return None
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS)
        if not files:
            known = ", ".join(LOCAL_BUILDERS)
            raise ConfigError(f"data directory '{data}' holds no data files ({known})")
    builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        known = ", ".join(LOCAL_BUILDERS)
        raise ConfigError(f"unsupported data file '{data}': use one of {known}")
    if len(builders) > 1:
        raise ConfigError(f"data directory '{data}' mixes file types; keep one kind of file")
    return builders.pop(), [str(p.resolve()) for p in files]


def load_rows(spec: DataSpec):
    """The dataset's rows (a ``datasets.Dataset``), first ``limit`` only; ConfigError on failure."""
    import datasets

    local = local_data_files(spec.data)
    if local is None and spec.data.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"data path '{spec.data}' does not exist")
    if local is not None and all(Path(f).stat().st_size == 0 for f in local[1]):
        raise ConfigError(f"dataset '{spec.data}' is empty; nothing to build")
    try:
        if local is not None:
            builder, files = local
            rows = datasets.load_dataset(builder, data_files={spec.split: files}, split=spec.split)
        else:
            rows = datasets.load_dataset(spec.data, spec.data_config, split=spec.split)
    except ConfigError:
        raise
    except Exception as error:  # datasets raises many types (not found, offline, bad split, parse)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(
            f"cannot load dataset '{spec.data}' split '{spec.split}' ({first_line}); pass a hub "
            "dataset id or local jsonl/json/parquet/csv/txt files"
        ) from error
    if spec.limit is not None and spec.limit < len(rows):
        rows = rows.select(range(spec.limit))
    field = spec.messages_field or spec.text_field
    if field not in rows.column_names:
        flag = "--messages-field" if spec.messages_field else "--text-field"
        raise ConfigError(
            f"dataset '{spec.data}' has no field '{field}' (fields: "
            f"{', '.join(rows.column_names) or 'none'}); pass {flag} NAME"
        )
    if len(rows) == 0:
        raise ConfigError(f"dataset '{spec.data}' split '{spec.split}' is empty; nothing to build")
    return rows


def row_content(row: dict[str, Any], spec: DataSpec) -> Any:
    """The part of a row that is used: its text, or its list of chat messages."""
    return row[spec.messages_field] if spec.messages_field else row[spec.text_field]


def is_holdout(content: Any, fraction: float) -> bool:
    """Deterministic split of one row by a hash of its content (stable under limit and order)."""
    if fraction <= 0:
        return False
    key = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


class RecordStream:
    """Tokenized, split, packed sequences of one dataset for one tokenizer."""

    def __init__(self, spec: DataSpec, tokenizer, rows=None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.rows = load_rows(spec) if rows is None else rows
        if spec.messages_field and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"--messages-field {spec.messages_field} needs a chat template, but the teacher's "
                "tokenizer has none; use a chat model's tokenizer or --text-field"
            )
        self.eos_id = tokenizer.eos_token_id
        self.group_size = resolve_group_rows(spec.group_rows, len(self.rows))
        self.tokenized_rows = 0  # rows this stream has tokenized (tests: no rank tokenizes more)

    @property
    def num_groups(self) -> int:
        """Row groups of the dataset (``ceil(rows / group_rows)``)."""
        return -(-len(self.rows) // self.group_size)

    def group_rows(self, group: int):
        """The rows of one group (a ``datasets.Dataset`` view; nothing is read yet)."""
        start = group * self.group_size
        if not 0 <= start < len(self.rows):
            raise ConfigError(f"row group {group} is outside the {self.num_groups} groups")
        if self.num_groups == 1:
            return self.rows
        return self.rows.select(range(start, min(start + self.group_size, len(self.rows))))

    def documents(
        self, split: str, group: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """``(token_ids (T,), target (T,) bool or None)`` of each row of ``split``, in row order
        (of one row ``group``, or of all rows).

        ``target[j]`` marks assistant tokens of chat rows (None for text: every token is a target).
        """
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
        want_holdout = split == "holdout"
        rows = self.rows if group is None else self.group_rows(group)
        for batch in rows.iter(batch_size=_TOKENIZE_BATCH):
            contents = batch[self.spec.messages_field or self.spec.text_field]
            kept = [c for c in contents if is_holdout(c, self.spec.holdout) == want_holdout]
            self.tokenized_rows += len(kept)
            if self.spec.messages_field:
                for messages in kept:
                    ids, target = render_chat(self.tokenizer, messages)
                    yield ids, target
                continue
            for index, text in enumerate(kept):
                if not isinstance(text, str):
                    raise ConfigError(
                        f"field '{self.spec.text_field}' holds {type(text).__name__} values, not "
                        f"text (row value {index}); pass the text column with --text-field"
                    )
            # verbose=False: rows longer than the model's max length are expected here (they are
            # packed or truncated below), so the tokenizer's "too long" warning is noise.
            encode = self.tokenizer(kept, add_special_tokens=True, verbose=False) if kept else None
            encoded = encode["input_ids"] if encode is not None else []
            for ids in encoded:
                yield np.asarray(ids, dtype=np.int32), None

    def sequences(self, split: str, rank: int = 0, world_size: int = 1) -> Iterator[SequenceInput]:
        """The sequences of ``split`` in the row groups of ``rank`` (``owned_groups``), in order.

        Only the rows of those groups are tokenized.
        """
        for group in owned_groups(self.num_groups, rank, world_size):
            yield from self.group_sequences(split, group)

    def group_sequences(self, split: str, group: int) -> Iterator[SequenceInput]:
        """The sequences of ``split`` made from the rows of one row group, in order."""
        chat = self.spec.messages_field is not None
        blocks = self._packed(split, group) if self.spec.pack else self._truncated(split, group)
        sequence_id = group << GROUP_ID_SHIFT
        for ids, target in blocks:
            if len(ids) == 0:
                continue
            if chat:
                positions = np.flatnonzero(target[1:]).astype(np.int32)  # predicts a target
                if len(positions) == 0:
                    continue
            else:
                positions = np.arange(len(ids), dtype=np.int32)
            yield SequenceInput(sequence_id, ids.astype(np.int32), positions)
            sequence_id += 1

    def _truncated(self, split: str, group: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        limit = self.spec.max_length
        for ids, target in self.documents(split, group):
            target = np.ones(len(ids), dtype=bool) if target is None else target
            yield ids[:limit], target[:limit]

    def _packed(self, split: str, group: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        limit = self.spec.max_length
        ids_buffer: list[np.ndarray] = []
        target_buffer: list[np.ndarray] = []
        buffered = 0
        chat = self.spec.messages_field is not None
        for ids, target in self.documents(split, group):
            target = np.ones(len(ids), dtype=bool) if target is None else target
            if self.eos_id is not None:  # EOS after every document; not distilled for chat
                ids = np.append(ids, np.int32(self.eos_id))
                target = np.append(target, not chat)
            ids_buffer.append(ids)
            target_buffer.append(target)
            buffered += len(ids)
            if buffered < limit:
                continue
            all_ids, all_target = np.concatenate(ids_buffer), np.concatenate(target_buffer)
            full = (len(all_ids) // limit) * limit
            for start in range(0, full, limit):
                yield all_ids[start : start + limit], all_target[start : start + limit]
            ids_buffer, target_buffer = [all_ids[full:]], [all_target[full:]]
            buffered = len(all_ids) - full
        if buffered:
            yield np.concatenate(ids_buffer), np.concatenate(target_buffer)


def _render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_chat(tokenizer, messages: Any) -> tuple[np.ndarray, np.ndarray]:
    """Render one conversation with the chat template: ``(token_ids (T,), assistant (T,) bool)``.

    Templates that mark assistant text with ``{% generation %}`` use the tokenizer's own
    ``return_assistant_tokens_mask``. Otherwise assistant tokens are found by rendering prefixes: the text of assistant message ``i`` spans
    from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
    ``render(messages[:i + 1])``; tokens whose characters overlap such a span are assistant tokens
    (the end-of-turn token included). Templates whose prefixes are not prefixes of the whole
    rendering (e.g. ones that rewrite earlier turns) are refused with a clear error.
    """
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise ConfigError(
            "chat rows must be lists of {'role': ..., 'content': ...} messages; check --messages-field"
        )
    if _GENERATION_TAG.search(tokenizer.chat_template or ""):
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        return ids, np.asarray(encoded["assistant_masks"], dtype=bool)
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:index], True) if index else _empty(tokenizer)
        end_text = _render(tokenizer, messages[: index + 1], False)
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise ConfigError(
                "the chat template does not render conversations prefix by prefix, so assistant "
                "tokens cannot be located; use a template without history rewriting"
            )
        spans.append((len(start_text), len(end_text)))
    encoded = tokenizer(
        full, add_special_tokens=False, return_offsets_mapping=True, verbose=False
    )  # truncated later, at --max-length
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (T, 2)
    assistant = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        assistant |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return ids, assistant


def _empty(tokenizer) -> str:
    """The rendering of no messages (a default system prompt, if the template adds one)."""
    try:
        return _render(tokenizer, [], True)
    except Exception:  # templates may refuse an empty conversation
        return ""
