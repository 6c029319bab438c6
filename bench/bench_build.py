"""``kdcache build`` throughput as a user meets it: marginal tokens/s against a bare forward loop.

    python bench/bench_build.py                      # the issue-15 setting, CPU, 1 and 2 threads
    python bench/bench_build.py --threads 1 --modes top64 --repeats 3
    python bench/bench_build.py --device cuda --hidden 768 --layers 12 --heads 12 --vocab 32000 \\
        --docs 40 --bare-batch 32                    # GPU-sized (bench/gpu_check.sh)

A Llama teacher (default: hidden 256, 4 layers, 4 heads, vocab 16,384, tied embeddings, random
init, the shipped demo tokenizer) is saved with ``save_pretrained``; ``--docs`` N and 3N standard
library source files are written as jsonl. Each build is the library call ``kdcache build`` makes,
``build_cache(BuildConfig(...))`` with the CLI's defaults (``--max-length 256 --holdout 0``; the
``top64`` mode adds ``--top-k 64``, ``default`` is top-24 + 16 tail samples), from loading the
teacher to the manifest. The marginal rate, (tokens(3N) - tokens(N)) / (time(3N) - time(N)),
cancels what does not grow with the data (imports, model and tokenizer loading, fingerprints);
it is compared with a bare ``model(input_ids).logits`` loop over the same tokens (the 3N build's
full-length sequences in batches of ``--bare-batch`` x max-length), in the same process, at the
same torch thread count. Repeats are interleaved (bare, build N, build 3N per mode) so that a
shared machine's noise hits all of them; wall-clock and process CPU time are both reported (CPU
time includes the build's background threads: the tokenizer prefetch and the shard writer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODES = {"top64": {"top_k": 64}, "default": {}}


def stdlib_documents(count: int) -> list[str]:
    """``count`` standard-library sources of 20-40k characters (repeated if the stdlib has fewer)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if 20_000 < p.stat().st_size < 40_000]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files[: max(count, 1)]]
    return [texts[i % len(texts)] for i in range(count)]


def save_teacher(directory: Path, hidden: int, layers: int, heads: int, vocab: int) -> None:
    """A random tied-embedding Llama with the demo tokenizer (its ids < 16,384 <= vocab)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kdcache.demo import demo_teacher_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_teacher_dir())
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden,
        intermediate_size=hidden * 8 // 3, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _clock() -> np.ndarray:
    return np.array([time.perf_counter(), time.process_time()])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Bench:
    """The teacher, the two datasets and the bare model of one setting."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        from transformers import AutoModelForCausalLM

        from kdcache.cache.build.data import RecordStream
        from kdcache.cache.build.teacher import load_tokenizer, resolve_dtype

        self.args, self.root = args, root
        self.teacher = root / "teacher"
        save_teacher(self.teacher, args.hidden, args.layers, args.heads, args.vocab)
        texts = [t[: args.doc_chars] for t in stdlib_documents(3 * args.docs)]
        self.data = {}
        for count in (args.docs, 3 * args.docs):
            path = root / f"docs{count}.jsonl"
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:count]))
            self.data[count] = path
        dtype = resolve_dtype("auto", torch.device(args.device))
        self.model = AutoModelForCausalLM.from_pretrained(self.teacher, dtype=dtype)
        self.model = self.model.to(args.device).eval()
        self.params = sum(p.numel() for p in self.model.parameters())
        stream = RecordStream(self.config(3 * args.docs, "top64").data_spec(),
                              load_tokenizer(str(self.teacher)))  # fmt: skip
        full = [
            s.input_ids for s in stream.sequences("train") if len(s.input_ids) == args.max_length
        ]
        step = args.bare_batch
        self.batches = [
            torch.from_numpy(np.stack(full[i : i + step]).astype(np.int64)).to(args.device)
            for i in range(0, len(full) - step + 1, step)
        ]
        self.bare_tokens = sum(b.numel() for b in self.batches)

    def config(self, docs: int, mode: str):
        from kdcache.cache.build.pipeline import BuildConfig

        return BuildConfig(
            teacher=str(self.teacher), data=str(self.data[docs]), out=self.root / "cache",
            max_length=self.args.max_length, holdout=0.0, device=self.args.device,
            progress=False, **MODES[mode], **self.sizes,
        )  # fmt: skip

    @property
    def sizes(self) -> dict:
        """--head-chunk-rows / --batch-tokens when given (else the build's defaults)."""
        given = {"head_chunk_rows": self.args.head_chunk_rows,
                 "batch_tokens": self.args.batch_tokens}  # fmt: skip
        return {key: value for key, value in given.items() if value is not None}

    def bare(self) -> np.ndarray:
        """(wall, cpu) tokens/s of ``model(input_ids).logits`` over the batches."""
        _sync(self.args.device)
        start = _clock()
        with torch.inference_mode():
            for batch in self.batches:
                _ = self.model(input_ids=batch).logits
        _sync(self.args.device)
        return self.bare_tokens / (_clock() - start)

    def build(self, docs: int, mode: str) -> tuple[np.ndarray, int]:
        """(wall, cpu) seconds of one fresh build and its tokens."""
        from kdcache.cache.build.pipeline import build_cache

        shutil.rmtree(self.root / "cache", ignore_errors=True)
        start = _clock()
        summary = build_cache(self.config(docs, mode))
        return _clock() - start, summary.num_tokens

    def marginal(self, mode: str) -> np.ndarray:
        """(wall, cpu) marginal tokens/s between the N- and 3N-document builds."""
        small_time, small_tokens = self.build(self.args.docs, mode)
        large_time, large_tokens = self.build(3 * self.args.docs, mode)
        extra = large_time - small_time  # (wall, cpu); not positive: too little data (noise)
        return np.where(extra > 0, (large_tokens - small_tokens) / np.maximum(extra, 1e-9), np.nan)


def _finite(value: float) -> float | None:
    """``value`` as a float, None where it is not a number (a marginal rate lost in noise)."""
    return float(value) if np.isfinite(value) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--docs", type=int, default=6, help="N: builds of N and 3N documents")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--bare-batch", type=int, default=8, help="sequences per bare batch")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--doc-chars", type=int, default=None, help="cut documents (dry runs)")
    parser.add_argument("--head-chunk-rows", default=None, help="auto or N (default: the build's)")
    parser.add_argument("--batch-tokens", default=None, help="auto or N (default: the build's)")
    parser.add_argument("--label", default=None, help="RESULT rows' mode becomes MODE/LABEL")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="kdcache-bench-build-"))
    try:
        bench = Bench(args, root)
        print(
            f"teacher: llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
            f"vocab {args.vocab}, tied, {bench.params / 1e6:.1f}M parameters, {args.device}; "
            f"builds of {args.docs} and {3 * args.docs} documents, max length "
            f"{args.max_length}; bare: {len(bench.batches)} batches of {args.bare_batch} x "
            f"{args.max_length}", flush=True,
        )  # fmt: skip
        results = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            ratios: dict[str, list[np.ndarray]] = {mode: [] for mode in args.modes}
            builds: dict[str, list[np.ndarray]] = {mode: [] for mode in args.modes}
            bares: dict[str, list[np.ndarray]] = {mode: [] for mode in args.modes}
            for repeat in range(args.repeats):
                for mode in args.modes:
                    bare = bench.bare()
                    build = bench.marginal(mode)
                    ratios[mode].append(build / bare)
                    builds[mode].append(build)
                    bares[mode].append(bare)
                    print(
                        f"  {threads} thread(s), repeat {repeat}, {mode}: tokens/s (wall, cpu) "
                        f"bare {bare[0]:.0f}, {bare[1]:.0f}; build (marginal) {build[0]:.0f}, "
                        f"{build[1]:.0f}; ratio {build[0] / bare[0]:.3f}, "
                        f"{build[1] / bare[1]:.3f}", flush=True,
                    )  # fmt: skip
            for mode in args.modes:
                wall = [r[0] for r in ratios[mode]]
                cpu = [r[1] for r in ratios[mode]]
                results.append((threads, mode, statistics.median(wall), max(wall),
                                statistics.median(cpu)))  # fmt: skip
                label = f"{mode}/{args.label}" if args.label else mode
                row = {"bench": "build", "device": args.device, "vocab": args.vocab, "mode": label,
                       "threads": threads, "build_over_bare": _finite(statistics.median(wall)),
                       "build_over_bare_cpu": _finite(statistics.median(cpu)),
                       "build_tokens_per_s": _finite(np.median([r[0] for r in builds[mode]])),
                       "bare_tokens_per_s": _finite(np.median([r[0] for r in bares[mode]]))}  # fmt: skip
                print("RESULT " + json.dumps(row), flush=True)
        print("\nbuild (marginal) / bare forward tokens/s, target >= 0.90")
        print(
            f"{'threads':>7} {'mode':>8} {'wall median':>12} {'wall best':>10} {'cpu median':>11}"
        )
        for threads, mode, median, best, cpu in results:
            print(f"{threads:>7} {mode:>8} {median:>12.3f} {best:>10.3f} {cpu:>11.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
