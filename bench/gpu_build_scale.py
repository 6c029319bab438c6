"""The build at GPU sizes with the device-sized head (issue 24): tokens/s against a bare forward.

    python bench/gpu_build_scale.py --gpu-tests       # CUDA: tests/test_gpu_head.py, then vocab
                                                      # 32k and 152k, auto vs old chunking
    python bench/gpu_build_scale.py --device cpu --hidden 64 --layers 1 --heads 1 --vocab 2048 \\
        --docs 1 --doc-chars 1500 --max-length 64 --chunkings auto   # bench/gpu_check.sh --dry-run

For each vocabulary and chunking, ``bench/bench_build.py`` runs the library build (top-64 and the
default mode, marginal tokens/s between builds of N and 3N documents) against a bare
``model(input_ids).logits`` loop, in one process:

* ``auto``: ``--head-chunk-rows auto --batch-tokens auto`` (on CUDA: sized from free memory,
  cache/extraction/sizing.py);
* ``old``: what the build did before issue 24 on every device: a head chunk of 2^24 logits
  (``2**24 // vocab`` rows, ~110 at vocab 152k) and 16,384 tokens per batch.

RESULT lines (``"bench": "build"``, mode ``top64/auto``, ``default/old`` ...) feed the table of
bench/gpu_check.sh. The teacher is a 12-layer hidden-768 Llama (GPU sizes of bench_build.py);
what matters at vocab 152k is the head: ~117M of its ~200M parameters.
"""

from __future__ import annotations

import argparse
import sys

import bench_build  # bench/ is on sys.path when this file runs as a script

CHUNKINGS = ("auto", "old")


def chunking_flags(chunking: str, vocab: int) -> list[str]:
    """bench_build.py flags of one chunking (``old``: the pre-issue-24 values)."""
    if chunking == "auto":
        return ["--head-chunk-rows", "auto", "--batch-tokens", "auto"]
    return ["--head-chunk-rows", str(max(1, (1 << 24) // vocab)), "--batch-tokens", "16384"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--chunkings", nargs="+", choices=CHUNKINGS, default=list(CHUNKINGS))
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--bare-batch", type=int, default=16)
    parser.add_argument("--doc-chars", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--gpu-tests", action="store_true", help="first: tests/test_gpu_head.py")
    args = parser.parse_args(argv)
    status = 0
    if args.gpu_tests:
        import subprocess

        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu_head.py",
                   "-rs", "-s", "-p", "no:cacheprovider"]  # fmt: skip
        status |= subprocess.run(command, check=False).returncode
    for vocab in args.vocab:
        for chunking in args.chunkings:
            print(f"--- vocab {vocab}, chunking {chunking}", flush=True)
            flags = ["--device", args.device, "--vocab", str(vocab), "--hidden", str(args.hidden),
                     "--layers", str(args.layers), "--heads", str(args.heads), "--docs",
                     str(args.docs), "--max-length", str(args.max_length), "--bare-batch",
                     str(args.bare_batch), "--threads", str(args.threads), "--repeats",
                     str(args.repeats), "--label", chunking, *chunking_flags(chunking, vocab)]  # fmt: skip
            if args.doc_chars is not None:
                flags += ["--doc-chars", str(args.doc_chars)]
            status |= bench_build.main(flags)
    return status


if __name__ == "__main__":
    sys.exit(main())
