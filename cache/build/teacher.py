"""The teacher: load a Hugging Face causal LM and turn batches of sequences into sparse top-k rows.

Batches are right-padded with an explicit ``attention_mask`` and ``position_ids = arange(T)``.
With right padding and causal attention a real token never attends to padding, and its position
ids are the same as in the unbatched forward, so the batched result equals the unbatched one for
every sequence (tested on Llama- and GPT-2-style models with mixed lengths).

The body runs once per batch; the output head + log-softmax + top-k then run chunk by chunk over
the selected positions only (``kdcache.cache.extraction.topk``), so the full (B, T, V) logits never exist.
Models whose logits cannot be split from the body (unknown post-processing) use the full forward.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from kdcache.cache.build.config import DTYPE_NAMES
from kdcache.cache.build.data import SequenceInput
from kdcache.cache.errors import ConfigError
from kdcache.cache.extraction.heads import OutputHead, body_of, fp32_output_gemm, resolve_head
from kdcache.cache.extraction.topk import (
    DEFAULT_CHUNK_ELEMENTS,
    ScratchBuffers,
    chunk_rows,
    head_logits,
    topk_from_hidden,
    topk_from_logit_rows,
)
from kdcache.cache.records import SequenceRecord
from kdcache.cache.requirements import (
    TRANSFORMERS_MIN,
    check_min_version,
    transformers_dtype_kwargs,
)

T = TypeVar("T")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class TopKRows:
    """The teacher's sparse distributions at the selected positions of one sequence."""

    topk_ids: np.ndarray  # (M, k) int32, most probable first
    topk_logprobs: np.ndarray  # (M, k) float32
    tail_mass: np.ndarray  # (M,) float32
    tail_ids: np.ndarray | None = None  # (M, s) int32 topk+tail mode: draws from p_j / p_tail
    tail_logprobs: np.ndarray | None = None  # (M, s) float32 teacher log p_j of those draws
    observed_logprobs: np.ndarray | None = None  # (M,) float32 log p of the next token (NaN: none)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"unknown --device '{device}': use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device} requested but CUDA is not available; use --device cpu"
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 elsewhere; else one of ``DTYPE_NAMES``."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown --dtype '{dtype}': use one of {', '.join(DTYPE_NAMES)}")
    return _DTYPES[dtype]


def looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (absolute, ./, ../, ~, or more than one '/')."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name


def _load_error(what: str, name: str, error: Exception) -> ConfigError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return ConfigError(
        f"cannot load the {what} from '{name}' ({first_line}); pass a local model directory "
        "or a Hugging Face model id"
    )


def load_tokenizer(teacher: str):
    """The teacher's tokenizer (``AutoTokenizer``); ConfigError when it cannot be loaded."""
    from transformers import AutoTokenizer

    _check_teacher_path(teacher)
    try:
        return AutoTokenizer.from_pretrained(
            str(Path(teacher).expanduser()) if looks_like_path(teacher) else teacher
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _load_error("tokenizer", teacher, error) from error


def _check_teacher_path(teacher: str) -> None:
    path = Path(teacher).expanduser()
    if looks_like_path(teacher) and not path.exists():
        raise ConfigError(
            f"teacher path '{teacher}' does not exist; pass a model directory or hub id"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"teacher '{teacher}' is a file; pass the model's directory")
    if path.is_dir() and not (path / "config.json").exists():
        raise ConfigError(
            f"teacher directory '{teacher}' has no config.json; pass a save_pretrained directory"
        )


def load_model(teacher: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in eval mode on ``device``; ConfigError on failure."""
    from transformers import AutoModelForCausalLM

    check_min_version("transformers", TRANSFORMERS_MIN)
    _check_teacher_path(teacher)
    name = str(Path(teacher).expanduser()) if looks_like_path(teacher) else teacher
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **model_load_kwargs(dtype, device))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _load_error("teacher", teacher, error) from error
    return model.to(device).eval()  # a no-op where it was loaded there already


def model_load_kwargs(dtype: torch.dtype, device: torch.device) -> dict:
    """``from_pretrained`` arguments that load the weights straight onto ``device``.

    ``device_map={"": device}`` places every weight on this rank's device as it is read (with
    ``low_cpu_mem_usage``: no full copy in host memory first; 8 ranks of a 7B bf16 teacher no
    longer need 8 x 15 GB of host memory). Needs ``accelerate`` where transformers asks for it.
    """
    return {
        **transformers_dtype_kwargs(dtype),
        "device_map": {"": str(device)},
        "low_cpu_mem_usage": True,
    }


def output_vocab_size(model: nn.Module) -> int:
    """Size of the model's logits' last dimension."""
    embeddings = model.get_output_embeddings()
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return int(embeddings.weight.shape[0])
    return int(model.config.vocab_size)


# Tokens per body call on the CPU. A 16k-token batch runs the body ~15-40% slower per token than
# 2k-token slices of it (measured on one thread, teacher hidden 256: 113-133 against 93-98 us per
# token): the activations of a slice stay in the caches. The slices give the same hidden states
# bit for bit (every op is per token or per sequence); on CUDA the whole batch runs at once.
CPU_BODY_TOKENS = 2048


class TeacherRunner:
    """Runs a causal LM over batches of token sequences and returns top-k rows per sequence."""

    def __init__(
        self,
        model: nn.Module,
        *,
        top_k: int,
        temperature: float = 1.0,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        use_head: bool = True,
        tail_samples: int = 0,
        sample_seed: int = 0,
        observed_logprobs: bool = False,
    ) -> None:
        self.model = model
        self.observed_logprobs = observed_logprobs  # also the log-prob of each next token
        self.top_k = top_k
        self.tail_samples, self.sample_seed = tail_samples, sample_seed
        self.temperature = temperature
        self.chunk_elements = chunk_elements
        self.scratch = ScratchBuffers()  # the head's (C, V) buffers, reused from batch to batch
        self.device = next(model.parameters()).device
        self.head: OutputHead | None = None
        if use_head:
            probe = torch.arange(1, 9, device=self.device)[None] % output_vocab_size(model)
            self.head = resolve_head(model, probe)
        if self.head is not None and not fp32_output_gemm(self.head, self.device):
            self.head.keep_fp32_weight()  # frozen teacher: one float32 copy, not one per chunk

    @torch.inference_mode()
    def run(
        self,
        sequences: Sequence[np.ndarray],
        positions: Sequence[np.ndarray] | None = None,
        sequence_ids: Sequence[int] | None = None,
    ) -> list[TopKRows]:
        """Top-k rows for each sequence of one batch.

        Args:
            sequences: B arrays of token ids, each (T_b,), T_b >= 1.
            positions: B arrays (M_b,) of positions to keep (strictly increasing, < T_b);
                None keeps every position.
            sequence_ids: B stable ids; with ``tail_samples`` they seed each sequence's draws
                (the same samples whatever batch the sequence lands in).

        Returns:
            B ``TopKRows`` with M_b rows each; row i is the distribution after position i.
        """
        if positions is None:
            positions = [np.arange(len(seq)) for seq in sequences]
        lengths = [len(seq) for seq in sequences]
        width = max(lengths)
        input_ids = torch.zeros(len(sequences), width, dtype=torch.long)  # (B, L), right padded
        attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)  # (B, L)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
            attention_mask[row, : len(seq)] = 1
        position_ids = torch.arange(width).expand(len(sequences), width)  # (B, L)
        rows = np.concatenate([np.full(len(p), b) for b, p in enumerate(positions)])  # (N,)
        cols = np.concatenate([np.asarray(p, dtype=np.int64) for p in positions])  # (N,)
        inputs = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "position_ids": position_ids.to(self.device),
        }
        row_index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        col_index = torch.as_tensor(cols, dtype=torch.long, device=self.device)
        next_ids = None
        if self.observed_logprobs:  # (N,) the token after each kept position, -1: none
            has_next = torch.as_tensor(cols + 1 < np.asarray(lengths)[rows])
            following = input_ids[
                torch.as_tensor(rows), torch.as_tensor(cols + 1).clamp_max(width - 1)
            ]
            next_ids = torch.where(has_next, following, -1).to(self.device)
        if self.head is not None:
            hidden = self._body(inputs)  # (B, L, H)
            selected = hidden[row_index, col_index]  # (N, H)
        else:
            logits = self.model(**inputs).logits  # (B, L, V)
            selected = logits[row_index, col_index]  # (N, V)
            del logits
        samples = observed = None
        if self.tail_samples:  # top-k and tail draws from one pass of the head
            ids, logprobs, tail, *samples = self._topk_and_samples(
                selected, positions, sequence_ids, next_ids
            )
            if next_ids is not None:
                observed = samples.pop()
        elif self.head is not None:
            ids, logprobs, tail, *observed = topk_from_hidden(
                selected, self.head, self.top_k, self.temperature, self.chunk_elements,
                scratch=self.scratch, next_ids=next_ids,
            )  # fmt: skip
        else:
            ids, logprobs, tail, *observed = topk_from_logit_rows(
                selected, self.top_k, self.temperature, self.chunk_elements, next_ids=next_ids
            )
        if isinstance(observed, list):
            observed = observed[0] if observed else None
        observed_host = None if observed is None else observed.float().cpu().numpy()
        if samples is not None:
            samples = [samples[0].to(torch.int32).cpu().numpy(), samples[1].cpu().numpy()]
        ids_host = ids.to(torch.int32).cpu().numpy()  # only (N, k) values cross to the host
        logprobs_host = logprobs.cpu().numpy()
        tail_host = tail.cpu().numpy()
        out, start = [], 0
        for p in positions:
            end = start + len(p)
            rows = TopKRows(ids_host[start:end], logprobs_host[start:end], tail_host[start:end])
            if samples is not None:
                rows.tail_ids, rows.tail_logprobs = samples[0][start:end], samples[1][start:end]
            if observed_host is not None:
                rows.observed_logprobs = observed_host[start:end]
            out.append(rows)
            start = end
        return out

    def _body(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L, H) final hidden states, in slices of ``CPU_BODY_TOKENS`` tokens on the CPU."""
        body = body_of(self.model)
        count, width = inputs["input_ids"].shape
        step = max(1, CPU_BODY_TOKENS // width) if self.device.type == "cpu" else count
        if step >= count:
            return body(**inputs).last_hidden_state
        return torch.cat(
            [
                body(
                    **{name: value[start : start + step] for name, value in inputs.items()}
                ).last_hidden_state
                for start in range(0, count, step)
            ]
        )

    def _topk_and_samples(self, selected, positions, sequence_ids, next_ids=None):
        """topk+tail mode: top-k plus (N, s) draws from each row's tail, seeded per sequence."""
        from kdcache.cache.extraction.tail_sampling import sequence_uniforms, topk_and_tail_samples

        if sequence_ids is None:
            raise ValueError("tail samples need the sequence ids (they seed the draws)")
        uniforms = np.concatenate(
            [
                sequence_uniforms(self.sample_seed, sid, len(p), self.tail_samples)
                for sid, p in zip(sequence_ids, positions, strict=True)
            ]
        )
        if self.head is not None:
            head = self.head
            rows = chunk_rows(head.vocab_size, self.chunk_elements)
            buffer = self.scratch.get(
                "logits", min(rows, selected.shape[0]), head.vocab_size, self.device
            )

            def logits_of(start: int, end: int):
                return head_logits(head, selected[start:end], buffer)  # one buffer, all chunks
        else:

            def logits_of(start: int, end: int):
                return selected[start:end]

        return topk_and_tail_samples(
            logits_of, selected.shape[0], output_vocab_size(self.model), self.top_k, uniforms,
            self.temperature, self.chunk_elements, scratch=self.scratch, next_ids=next_ids,
        )  # fmt: skip


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices into batches of at most ``batch_tokens`` padded tokens.

    Sequences are sorted by length (longest first, ties by index) so each batch holds similar
    lengths; a sequence longer than the budget gets a batch of its own. Deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        new_width = max(width, lengths[index])
        if current and new_width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, new_width = [], lengths[index]
        current.append(index)
        width = new_width
    if current:
        batches.append(current)
    return batches


def windows(
    sequences: Iterable[SequenceInput], window_tokens: int
) -> Iterator[list[SequenceInput]]:
    """Consecutive groups of sequences holding at least ``window_tokens`` tokens (last: fewer).

    Batches are planned inside a window, so the window boundaries depend only on the stream: a
    resumed build recomputes exactly the batches of an uninterrupted one.
    """
    window: list[SequenceInput] = []
    tokens = 0
    for sequence in sequences:
        window.append(sequence)
        tokens += len(sequence.input_ids)
        if tokens >= window_tokens:
            yield window
            window, tokens = [], 0
    if window:
        yield window


def prefetch(iterable: Iterable[T], size: int = 2) -> Iterator[T]:
    """Iterate ``iterable`` on a background thread (tokenization overlaps the teacher pass).

    Errors of the producer are re-raised in the consumer.
    """
    items: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        """Hand ``item`` over unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # handed to the consumer
            put(_Failure(error))

    thread = threading.Thread(target=produce, name="kdcache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()


@dataclass
class _Failure:
    error: BaseException


def run_sequences(
    runner: TeacherRunner,
    sequences: Iterable[SequenceInput],
    batch_tokens: int,
    skip: int = 0,
    window_tokens: int | None = None,
) -> Iterator[SequenceRecord]:
    """Teacher records for ``sequences`` in stream order, the first ``skip`` left out.

    Sequences are grouped into windows (``window_tokens``, default 4 batches), sorted by length
    and batched by ``batch_tokens`` inside each window. Windows wholly inside the skipped prefix
    are not run at all; a window that straddles it is run whole (identical batches) and its
    skipped records dropped.
    """
    window_tokens = window_tokens or 4 * batch_tokens
    seen = 0
    for window in prefetch(windows(sequences, window_tokens)):
        if seen + len(window) <= skip:
            seen += len(window)
            continue
        results: list[TopKRows | None] = [None] * len(window)
        for batch in plan_batches([len(s.input_ids) for s in window], batch_tokens):
            rows = runner.run(
                [window[i].input_ids for i in batch],
                [window[i].positions for i in batch],
                [window[i].sequence_id for i in batch],
            )
            for index, row in zip(batch, rows, strict=True):
                results[index] = row
        for sequence, rows in zip(window, results, strict=True):
            seen += 1
            if seen <= skip:
                continue
            assert rows is not None
            yield SequenceRecord(
                sequence_id=sequence.sequence_id,
                input_ids=sequence.input_ids,
                topk_ids=rows.topk_ids,
                topk_logprobs=rows.topk_logprobs,
                tail_mass=rows.tail_mass,
                positions=sequence.positions,
                tail_ids=rows.tail_ids,
                tail_logprobs=rows.tail_logprobs,
                observed_logprobs=rows.observed_logprobs,
            )
