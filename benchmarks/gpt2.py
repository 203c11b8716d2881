"""GPT-2 small's shape against transformers and PyTorch (issue 21's speed targets), with random
weights: 12 layers, 12 heads, 768 wide, vocab 50,257, block 1024.

A random GPT2LMHeadModel is saved in the Hugging Face format (safetensors) and converted with
`gpt.convert --from-hf`, so both engines hold the same weights. Then, side by side on the same
CPU and threads, the engines alternating round by round:

  sample   256 new tokens, greedy, from a 32-token prompt, with the KV cache: gpt.sample's
           loop (sample_tokens at temperature 0) against transformers' generate(do_sample=False,
           use_cache=True); tokens/s (the prompt's reading included in both)
  step     one fine-tuning step on a batch of 4 x 256 tokens: gpt.train's step (forward,
           backward, gradient clipping, AdamW, on the threads gpt.train uses, with the
           allocator settings gpt.train makes at start-up) against PyTorch
           eager (the same four, torch.optim.AdamW); and with --bf16 the same in mixed
           precision: our --dtype bfloat16 against torch.autocast("cpu", torch.bfloat16)
  rss      the peak resident memory of a fresh process that loads the converted run for
           sampling (gpt.checkpoint.load_model), against the weights' bytes

    python benchmarks/gpt2.py                         # all three, 3 rounds, threads: 1 / all
    python benchmarks/gpt2.py --only sample --rounds 5 --sample-threads 2
    python benchmarks/gpt2.py --only step --bf16

Medians and [min-max] over the rounds; the CPU and a measured sgemm peak are printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from machine import cpu_name, sgemm_peak, summary  # benchmarks/machine.py

import tensorlite

SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_models(folder: str, shape: dict):
    """A random GPT-2 of `shape` in `folder` (HF format) and its conversion in folder/run."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt import convert

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    hf.save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(SHAPE["vocab_size"] - 1)}  # a stand-in vocabulary:
    vocab["<|endoftext|>"] = SHAPE["vocab_size"] - 1  # the benchmarks feed ids, not text
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    run = os.path.join(folder, "run")
    convert.from_hf(folder, run)
    return hf, run


def bench_sample(hf, run: str, rounds: int, threads: int) -> None:
    import torch

    from gpt.checkpoint import load_model
    from gpt.sample import sample_tokens

    tensorlite.set_num_threads(threads)
    torch.set_num_threads(threads)
    model, _ = load_model(run)
    prompt = list(np.random.default_rng(0).integers(0, 50000, 32))
    n = 256
    ours, theirs, same = [], [], True
    for _ in range(rounds):
        t = time.perf_counter()
        got = list(sample_tokens(model, prompt, n, temperature=0.0, eos_id=None))
        ours.append(n / (time.perf_counter() - t))
        ids = torch.tensor([prompt])
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        theirs.append(n / (time.perf_counter() - t))
        same = same and out[0, 32:].tolist() == got
    ratio = [a / b for a, b in zip(ours, theirs)]
    print(f"sample 256 tokens after 32, greedy, KV cache, {threads} thread(s):")
    print(f"  gpt (sample_tokens)          {summary(ours, '.1f')} tokens/s")
    print(f"  transformers generate        {summary(theirs, '.1f')} tokens/s")
    print(f"  ratio gpt / transformers     {summary(ratio, '.2f')}x   (same tokens: {same})")


def bench_step(hf, run: str, rounds: int, bf16: bool) -> None:
    import torch

    from gpt.config import TrainConfig
    from gpt.convert import load_pretrained
    from gpt.model import GPT
    from gpt.optim import AdamW, clip_grad_norm
    from gpt.train import make_grad_fn

    tensorlite.kernels.tune_allocator()  # as gpt.train does at start-up (gpt/cli.py)
    config, weights, _ = load_pretrained(run)
    dtype = "bfloat16" if bf16 else np.float32
    model = GPT(config, dtype=dtype)
    model.load_state_dict(weights)
    cfg = TrainConfig(model=config, batch_size=4, dtype="bfloat16" if bf16 else "float32")
    fns = make_grad_fn(model, cfg)  # gpt.train's: split over the cores' threads
    opt = AdamW(model.params, lr=1e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, config.vocab_size, (4, 256)) for _ in range(2))
    torch.set_num_threads(os.cpu_count() or 1)
    hf.train()
    topt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def ours_step():
        fns.loss_and_grads(x, y, rng)
        clip_grad_norm(model.params, 1.0, fns.grad_norm())
        opt.step(lr=1e-4)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = hf(tx).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     ty.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        topt.step()

    ours_step(), torch_step()  # warm-up: buffers, thread pools, allocator
    ours, theirs = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        ours_step()
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch_step()
        theirs.append(time.perf_counter() - t)
    fns.close()
    ratio = [b / a for a, b in zip(ours, theirs)]
    what = "bf16 (--dtype bfloat16 vs torch.autocast bf16)" if bf16 else "float32"
    print(f"one fine-tuning step, batch 4 x 256, {what}, {os.cpu_count()} threads:")
    print(f"  gpt (gpt.train's step)       {summary(ours, '.2f')} s")
    print(f"  PyTorch eager                {summary(theirs, '.2f')} s")
    print(f"  speed gpt / PyTorch          {summary(ratio, '.2f')}x")


def bench_rss(run: str, rounds: int) -> None:
    # VmHWM: the peak resident set of this process image (ru_maxrss would carry the parent's
    # peak across fork and exec on Linux)
    code = ("import sys\n"
            "def hwm():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmHWM:'):\n"
            "            return int(line.split()[1]) * 1024\n"
            "from gpt.checkpoint import load_model\n"
            "before = hwm()\n"
            "m, t = load_model(sys.argv[1])\n"
            "print(before, hwm(), sum(p.data.nbytes for p in m.parameters()))\n")
    rows = []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", code, run], capture_output=True, text=True,
                             check=True, env=dict(os.environ, PYTHONPATH=REPO)).stdout.split()
        rows.append([int(v) for v in out])
    weights = rows[0][2]
    peak = [r[1] / weights for r in rows]
    after_imports = [(r[1] - r[0]) / weights for r in rows]
    print(f"peak RSS loading the run for sampling (weights {weights / 1e6:.0f} MB, float32):")
    print(f"  whole process / weights      {summary(peak, '.2f')}x "
          f"({summary([r[1] / 1e6 for r in rows])} MB)")
    print(f"  above the imports / weights  {summary(after_imports, '.2f')}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("sample", "step", "rss"), action="append",
                   help="run only these (repeatable); default: all three")
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement (default 3)")
    p.add_argument("--sample-threads", type=int, default=1,
                   help="threads of both engines while sampling (default 1, gpt.sample's)")
    p.add_argument("--bf16", action="store_true", help="also the step in bf16 mixed precision")
    p.add_argument("--tiny", action="store_true",
                   help="2 layers of width 64 instead of GPT-2 small (to try the script)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.sample_threads < 1:
        print("error: --rounds and --sample-threads must be at least 1", file=sys.stderr)
        return 1
    only = set(args.only or ("sample", "step", "rss"))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; sgemm peak {sgemm_peak():.0f} GFLOP/s "
          f"(512^3, all threads); kernels: {tensorlite.kernels.kernel_path()}")
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        shape = dict(SHAPE, n_layer=2, n_head=2, n_embd=64) if args.tiny else SHAPE
        hf, run = make_models(folder, shape)
        print(f"GPT-2 of shape {shape}, random weights, saved and converted in "
              f"{time.perf_counter() - t:.0f} s")
        if "sample" in only:
            bench_sample(hf, run, args.rounds, args.sample_threads)
        if "step" in only:
            bench_step(hf, run, args.rounds, bf16=False)
            if args.bf16:
                bench_step(hf, run, args.rounds, bf16=True)
        if "rss" in only:
            bench_rss(run, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
