"""GPU smoke of ``kdcache train`` for multi-day runs: a kill -9 during a save, a resume, and FSDP.

1. writes a synthetic cache (random top-k rows, the demo tokenizer) and a student config
   (default: ~0.5B Llama, hidden 896 x 24 layers, vocab 152k: a Qwen2-0.5B-sized student);
2. runs ``kdcache train --steps 100 --save-every 25`` in a subprocess and SIGKILLs it while
   ``step-50`` is half written (test hook ``KDCACHE_TEST_SAVE_SLEEP``); checks that ``step-25``
   is the latest checkpoint, resumes with ``--resume`` to step 100 and loads ``final/`` with
   transformers; prints the resumed run's tokens/s;
3. with >= 2 GPUs: 100 steps under torchrun on every GPU (up to 8) with DDP and with ``--fsdp``:
   tokens/s and the peak memory of rank 0, side by side (the dry run with
   ``KDCACHE_SMOKE_PARALLEL=1``: 2 gloo ranks on the CPU).

Each result is a ``RESULT {json}`` line. ``--dry-run``: the same on the CPU at tiny sizes
(bench/gpu_check.sh --dry-run, tests/test_gpu_check.py).

    python bench/gpu_train_smoke.py            # on a CUDA machine
    python bench/gpu_train_smoke.py --dry-run  # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _student_config(path: Path, args) -> Path:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab,
        "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
    }  # fmt: skip
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _cache(directory: Path, args) -> Path:
    from bench_loader import synthetic_cache

    synthetic_cache(directory, args.vocab, args.top_k, args.sequences, args.seq)
    shutil.copytree(ROOT / "demo" / "teacher", directory / "tokenizer",
                    ignore=shutil.ignore_patterns("*.safetensors", "config.json", "training.json",
                                                  "generation_config.json"))  # fmt: skip
    from transformers import AutoTokenizer

    from kdcache.cache.build.fingerprint import tokenizer_fingerprint

    manifest = json.loads((directory / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    manifest["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def _train_command(args, cache: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", "train", "--cache", str(cache), "--student",
            str(student), "--out", str(out), "--steps", str(args.steps), "--batch-size",
            str(args.batch), "--save-every", str(args.save_every), "--device", args.device,
            "--no-progress", "--log-every", "5", "--lr", "3e-4", *extra]  # fmt: skip


def _last_rate(out: Path) -> float | None:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [line["tokens_per_s"] for line in lines if line.get("kind") == "train"]
    return rates[-1] if rates else None


def kill_and_resume(args, cache: Path, student: Path, work: Path) -> dict:
    from kdcache.trainer.checkpoint import latest_checkpoint
    from kdcache.trainer.checkpoint_policy import SAVE_SLEEP_ENV

    out, kill_at = work / "run", 2 * args.save_every
    env = dict(os.environ, **{SAVE_SLEEP_ENV: f"step-{kill_at}:600"})
    started = time.perf_counter()
    process = subprocess.Popen(_train_command(args, cache, student, out), env=env)
    try:
        while not any(
            (p / "model.safetensors").is_file() for p in out.glob(f".tmp-step-{kill_at}-*")
        ):
            if process.poll() is not None:
                raise SystemExit(f"the run ended (exit {process.returncode}) before step-{kill_at}")
            time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    killed_after = time.perf_counter() - started
    latest = latest_checkpoint(out)
    ok = latest is not None and latest.name == f"step-{args.save_every}"
    print(f"killed during the step-{kill_at} save after {killed_after:.0f}s; latest: {latest}")
    subprocess.run(_train_command(args, cache, student, out, "--resume"), check=True)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    ok = ok and not list(out.glob(".tmp-*"))
    state = json.loads((out / "run.json").read_text())
    return {"bench": "train-smoke", "killed_in_save": f"step-{kill_at}", "resumable": ok,
            "final_params": sum(p.numel() for p in model.parameters()),
            "steps": state["steps"], "resumed_tokens_per_s": _last_rate(out)}  # fmt: skip


def _worker(argv: list[str]) -> None:
    """One torchrun rank: train, then print rank 0's peak memory."""
    import torch

    from kdcache.trainer import TrainConfig, train

    config = TrainConfig(**json.loads(argv[0]))
    result = train(config)
    if result.rank == 0:
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        print("PEAK " + json.dumps({"peak_mib": peak}), flush=True)


def ddp_vs_fsdp(args, cache: Path, student: Path, work: Path, gpus: int) -> list[dict]:
    rows = []
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        out = work / name
        config = dict(cache=str(cache), student=str(student), out=str(out), steps=args.steps,
                      batch_size=args.batch, device=args.device, progress=False, log_every=5,
                      save_every=0, save_every_minutes=0, fsdp=fsdp)  # fmt: skip
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
                   __file__, "--worker", json.dumps(config)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        peak = None
        for line in done.stdout.splitlines():
            if line.startswith("PEAK "):
                peak = json.loads(line[5:])["peak_mib"]
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
        rows.append({"bench": "train-parallel", "mode": name, "gpus": gpus,
                     "ok": done.returncode == 0, "tokens_per_s": _last_rate(out)
                     if (out / "metrics.jsonl").is_file() else None, "peak_mib": peak})  # fmt: skip
    return rows


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    parser.add_argument("--device", default="cuda")
    for name, default in (("vocab", 152064), ("hidden", 896), ("intermediate", 4864),
                          ("layers", 24), ("heads", 14), ("kv-heads", 2), ("seq", 1024),
                          ("sequences", 64), ("top-k", 24), ("batch", 4), ("steps", 100),
                          ("save-every", 25)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    if args.dry_run:  # the demo tokenizer has 16384 tokens: the student's vocabulary covers it
        args.device, args.vocab, args.hidden, args.intermediate = "cpu", 16384, 32, 64
        args.layers, args.heads, args.kv_heads, args.seq = 1, 2, 2, 32
        args.sequences, args.top_k, args.batch, args.steps, args.save_every = 8, 4, 2, 12, 4
    import torch

    work = Path(tempfile.mkdtemp(prefix="kdcache-train-smoke-"))
    try:
        cache = _cache(work / "cache", args)
        student = _student_config(work / "student.json", args)
        smoke = kill_and_resume(args, cache, student, work)
        print("RESULT " + json.dumps(smoke), flush=True)
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        if args.dry_run and os.environ.get("KDCACHE_SMOKE_PARALLEL") == "1":
            gpus = 2  # 2 gloo ranks on the CPU (~1 minute of torchrun start-ups: not by default)
        if gpus >= 2:
            for row in ddp_vs_fsdp(args, cache, student, work, min(gpus, 8)):
                print("RESULT " + json.dumps(row), flush=True)
        else:
            print(f"DDP vs --fsdp: skipped, needs >= 2 GPUs (this machine: {gpus})")
        return 0 if smoke["resumable"] else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
