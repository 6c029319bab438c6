"""``fast_topk`` against ``torch.topk`` side by side, on the CPU: time per row and their ratio.

    python bench/bench_topk.py                       # 1 thread, vocab 16k / 32k / 128k / 152k
    python bench/bench_topk.py --vocab 16384 --k 24 64 --threads 1 2 --repeats 7

Rows are random normal logits scaled by 3 (no ties), in chunks of ``--elements`` values (the
build's chunk: 2^24 by default). For each setting the two functions run alternately
``--repeats`` times; the best process-CPU time and the best wall time per row of each are
printed with the ratio fast / torch (below 1: fast_topk is faster), and the results are checked
to be equal.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kdcache.cache.extraction.topk import fast_topk


def _timed(function, values: torch.Tensor, top_k: int) -> tuple[float, float]:
    """(wall, cpu) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function(values, top_k)
    return time.perf_counter() - wall, time.process_time() - cpu


def _torch_topk(values: torch.Tensor, top_k: int):
    return torch.topk(values, top_k, dim=-1, largest=True, sorted=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[16384, 32000, 131072, 151936])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 24, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--elements", type=int, default=1 << 24, help="values per chunk")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"{'threads':>7} {'vocab':>7} {'k':>4} {'rows':>5} {'torch us/row':>13} "
          f"{'fast us/row':>12} {'cpu ratio':>10} {'wall ratio':>11}")  # fmt: skip
    for threads in args.threads:
        torch.set_num_threads(threads)
        for vocab in args.vocab:
            rows = max(1, args.elements // vocab)
            gen = torch.Generator().manual_seed(vocab)
            values = 3.0 * torch.randn(rows, vocab, generator=gen)  # (rows, V)
            for top_k in args.k:
                got, want = fast_topk(values, top_k), _torch_topk(values, top_k)
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    raise SystemExit(f"fast_topk differs from torch.topk at V {vocab}, k {top_k}")
                best = {"torch": [float("inf")] * 2, "fast": [float("inf")] * 2}
                for _ in range(args.repeats):
                    for name, function in (("torch", _torch_topk), ("fast", fast_topk)):
                        wall, cpu = _timed(function, values, top_k)
                        best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
                plain, fast = best["torch"], best["fast"]
                print(f"{threads:>7} {vocab:>7} {top_k:>4} {rows:>5} "
                      f"{1e6 * plain[1] / rows:>13.1f} {1e6 * fast[1] / rows:>12.1f} "
                      f"{fast[1] / plain[1]:>10.2f} {fast[0] / plain[0]:>11.2f}",
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
