"""gpt.serve under load, on loopback: tokens/s of one stream alone and of 8 concurrent streams
(continuous batching decodes them together), the time to first token of a request alone and of
one arriving while 7 others stream, and a burst of 200 requests at once (how many are answered,
how many refused with 429, the server's memory, and a normal answer afterwards).

For each model shape a server subprocess (127.0.0.1, a free port, gpt.serve's default limits:
--max-batch 8, --max-queue 64) serves a random-init float32 model with a 65-character
vocabulary; sampling never draws EOS, so every request streams exactly the tokens it asks for.
The shapes: "baby" (4 layers, 8 heads, n_embd 128, block 64: the default of gpt.train) and
"6x384" (6 layers, 6 heads, n_embd 384, block 256). Each round runs, in turn: one stream
alone, 8 streams at once, and 7 streams with an eighth request sent once they all stream (each
request: a 7-character prompt, --tokens tokens, temperature 1, its own seed). We print
medians and [min-max] over the rounds, the CPU and a measured sgemm peak, and a summary
against issue 22's targets. With --compare DIR, the server of another checkout (an earlier
commit) runs beside this one, the two taking turns in every round (ABBA): a before/after
comparison on a shared machine, both under the same load.

    python benchmarks/serve.py                     # both shapes, 5 rounds of 200 tokens
    python benchmarks/serve.py --shapes baby --rounds 3 --tokens 100 --threads 2
    git worktree add /tmp/before 695f8b0 && \
        python benchmarks/serve.py --shapes baby --burst 0 --compare /tmp/before
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np
from machine import cpu_name, sgemm_peak, summary  # benchmarks/machine.py

import tensorlite
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.serve import SAMPLING_THREADS
from gpt.tokenizer import CharTokenizer

PROMPT = "THE SEA"  # the vocabulary is chr(32)..chr(96): capitals, digits, punctuation
SHAPES = {"baby": {"n_layer": 4, "n_head": 8, "n_embd": 128, "block_size": 64},
          "6x384": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}}
TARGET_RATIO = {"baby": 4.0, "6x384": 2.5}  # issue 22: 8 streams' total tokens/s / one alone
TARGET_TTFT_RATIO = 3.0  # a request's first token while 7 stream / alone, at most
CONCURRENT = 8
BURST = 200


def benchmark_tokenizer() -> CharTokenizer:
    return CharTokenizer([chr(c) for c in range(32, 97)])  # 65 printable characters


def benchmark_model(shape: str) -> GPT:
    cfg = GPTConfig(vocab_size=benchmark_tokenizer().vocab_size, **SHAPES[shape])
    return GPT(cfg, dtype=np.float32, seed=0)


def serve_forever(shape: str, threads: int) -> None:
    """The server subprocess: print the URL, serve until stdin closes."""
    from gpt.serve import create_app, running

    tensorlite.set_num_threads(threads)
    app = create_app(benchmark_model(shape), benchmark_tokenizer(), "bench", max_tokens=100_000)
    with running(app) as url:
        print(url, flush=True)
        sys.stdin.read()  # the parent closes our stdin to stop us


# ---- the client side ---------------------------------------------------------------------------
def stream_once(url: str, tokens: int, seed: int, streaming: threading.Event | None = None
                ) -> dict:
    """One streamed completion: seconds to the first text chunk and to the end, and tokens.
    `streaming` is set when the first text arrives."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = json.dumps({"prompt": PROMPT, "max_tokens": tokens, "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    first, usage = None, None
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"status": r.status}
        for line in r:  # (parsed only as far as needed: the client shares the CPU)
            if not line.startswith(b"data: {"):
                continue
            if first is None or b'"usage"' in line:
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif first is None and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - t0
                    if streaming is not None:
                        streaming.set()
    finally:
        conn.close()
    return {"status": 200, "ttft": first, "seconds": time.perf_counter() - t0,
            "tokens": usage["completion_tokens"]}


def concurrent(url: str, tokens: int, streams: int, seed: int) -> tuple[float, list[dict]]:
    """`streams` requests at once: (wall seconds, each one's result)."""
    results: list[dict] = [{}] * streams
    start = threading.Barrier(streams + 1)

    def run(i: int) -> None:
        start.wait()
        results[i] = stream_once(url, tokens, seed + i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def ttft_among(url: str, tokens: int, others: int, seed: int) -> float:
    """Seconds to the first token of a request sent once `others` streams are all streaming."""
    flags = [threading.Event() for _ in range(others)]
    threads = [threading.Thread(target=stream_once, args=(url, tokens, seed + i, flags[i]))
               for i in range(others)]
    for t in threads:
        t.start()
    for f in flags:
        f.wait(600)
    late = stream_once(url, tokens, seed + others)
    for t in threads:
        t.join()
    return late["ttft"]


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """The process's resident memory (VmRSS) or its peak (VmHWM), MB (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def burst(url: str, pid: int, tokens: int) -> dict:
    """BURST requests at once: how each ended, the server's memory before, at its peak and
    after, and whether a normal request is answered afterwards."""
    before = rss_mb(pid)
    results: list[dict] = [{}] * BURST

    def run(i: int) -> None:
        try:
            results[i] = stream_once(url, tokens, i)
        except OSError as e:  # refused or reset: counted as such
            results[i] = {"status": type(e).__name__}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(BURST)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    statuses: dict = {}
    for r in results:
        statuses[r.get("status")] = statuses.get(r.get("status"), 0) + 1
    after = stream_once(url, 20, 0)
    return {"statuses": statuses, "wall": wall, "rss_before": before, "rss_peak": rss_mb(
        pid, "VmHWM"), "rss_after": rss_mb(pid), "after": after}


def step_costs(shape: str, repeats: int = 300) -> dict:
    """In this process, no HTTP: the seconds of one decoder step for a sequence alone (the
    model's Decoder, as gpt.sample), for CONCURRENT sequences in one batched step (tensorlite's
    decode_step on the path in use: the C loop by default), and for the same batched step on
    the NumPy references ("batch_numpy"), each at position block_size/2, taken in turns; the
    20th percentile of each (a busy machine's noise only ever adds)."""
    from gpt.batching import BatchDecoder

    model = benchmark_model(shape)
    half = model.config.block_size // 2
    batch = BatchDecoder(model, CONCURRENT)
    for slot in range(CONCURRENT):
        batch.prefill(slot, [5] * half)
    path = tensorlite.kernels.kernel_path()
    times: dict[str, list[float]] = {"alone": [], "batch": [], "batch_numpy": []}
    try:
        for _ in range(repeats):
            for name, taken in times.items():
                batch.lengths[:] = half
                # (on the references: every kernel of the step, the head's too)
                tensorlite.kernels.use_kernels("numpy" if name == "batch_numpy" else path)
                slots = [0] if name == "alone" else list(range(CONCURRENT))
                t0 = time.perf_counter()
                batch.step(slots, [5] * len(slots))
                taken.append(time.perf_counter() - t0)
    finally:
        tensorlite.kernels.use_kernels(path)
    return {k: float(np.percentile(v, 20)) for k, v in times.items()}


def start_server(shape: str, threads: int, tree: str | None = None
                 ) -> tuple[subprocess.Popen, str]:
    """A server subprocess of this checkout, or (tree) of another one: its gpt and
    benchmarks/serve.py, for a before/after comparison in one run."""
    script, path = __file__, sys.path
    if tree is not None:
        script = os.path.join(tree, "benchmarks", "serve.py")
        path = [tree, os.path.join(tree, "benchmarks"), *path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    server = subprocess.Popen([sys.executable, script, "--serve", shape, "--threads",
                               str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    url = server.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), f"the server did not start: {url!r}"
    return server, url


def stop_server(server: subprocess.Popen) -> None:
    server.stdin.close()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


ROWS = ("one", "one_ttft", "many_total", "many_each", "ratio", "late_ttft", "ttft_ratio")


def measure(shape: str, args) -> tuple[dict, dict]:
    """Rounds of one alone, 8 at once and a late eighth, on this checkout's server and (with
    --compare) another checkout's, the two taking turns (ABBA), then the burst on this one:
    ({variant: {row: [value per round]}}, the burst's figures)."""
    variants = {"this": start_server(shape, args.threads)}
    try:
        if args.compare:
            variants["compare"] = start_server(shape, args.threads, args.compare)
        rows: dict = {v: {k: [] for k in ROWS} for v in variants}
        for _, url in variants.values():
            stream_once(url, 8, 0)  # warm-up
            concurrent(url, 8, CONCURRENT, 0)
        for r in range(args.rounds):
            for v in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                url, out = variants[v][1], rows[v]
                one = stream_once(url, args.tokens, seed=r)
                wall, many = concurrent(url, args.tokens, CONCURRENT, seed=100 * r)
                late = ttft_among(url, args.tokens, CONCURRENT - 1, seed=1000 * r)
                out["one"].append(one["tokens"] / one["seconds"])
                out["one_ttft"].append(1e3 * one["ttft"])
                out["many_total"].append(sum(m["tokens"] for m in many) / wall)
                out["many_each"].append(statistics.median(m["tokens"] / m["seconds"]
                                                          for m in many))
                out["ratio"].append(out["many_total"][-1] / out["one"][-1])
                out["late_ttft"].append(1e3 * late)
                out["ttft_ratio"].append(out["late_ttft"][-1] / out["one_ttft"][-1])
        server, url = variants["this"]
        flood = burst(url, server.pid, args.burst_tokens) if args.burst else {}
    finally:
        for server, _ in variants.values():
            stop_server(server)
    return rows, flood


def report(rows: dict) -> None:
    print(f"  1 stream alone                 {summary(rows['one'])} tokens/s, first token "
          f"after {summary(rows['one_ttft'], '.1f')} ms")
    print(f"  {CONCURRENT} concurrent streams, total    {summary(rows['many_total'])} "
          f"tokens/s = {summary(rows['ratio'], '.2f')}x one alone")
    print(f"  {CONCURRENT} concurrent streams, each     {summary(rows['many_each'])} tokens/s")
    print(f"  first token of a request sent while {CONCURRENT - 1} stream: "
          f"{summary(rows['late_ttft'], '.1f')} ms = {summary(rows['ttft_ratio'], '.2f')}x "
          "alone")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200, help="tokens per request")
    ap.add_argument("--shapes", default="baby,6x384", help="comma-separated: baby, 6x384")
    ap.add_argument("--threads", type=int, default=SAMPLING_THREADS,
                    help="BLAS threads in the server (default: gpt.serve's)")
    ap.add_argument("--burst", type=int, default=1, help="1: also send 200 requests at once")
    ap.add_argument("--burst-tokens", type=int, default=50, help="tokens per burst request")
    ap.add_argument("--compare", metavar="DIR", help="another checkout of this repository "
                    "(e.g. a `git worktree add DIR COMMIT`): its server runs beside this one's, "
                    "the two taking turns in every round")
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # the subprocess: its shape
    args = ap.parse_args()
    if args.serve:
        return serve_forever(args.serve, args.threads)
    shapes = args.shapes.split(",")
    if args.rounds < 1 or args.tokens < 1 or args.threads < 1 or not set(shapes) <= set(SHAPES):
        ap.error(f"--rounds, --tokens and --threads must be >= 1 and --shapes among "
                 f"{', '.join(SHAPES)}")
    if args.compare and not os.path.isfile(os.path.join(args.compare, "benchmarks", "serve.py")):
        ap.error(f"--compare {args.compare}: no benchmarks/serve.py there; give a checkout of "
                 "this repository (git worktree add DIR COMMIT)")
    tensorlite.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; sgemm peak {sgemm_peak():.0f} GFLOP/s "
          f"(512^3 float32, {args.threads} thread(s)); {args.threads} BLAS thread(s) in the "
          f"server; {args.tokens} tokens per request; {args.rounds} rounds, median [min-max]",
          flush=True)
    summary_lines = []
    for shape in shapes:
        steps = step_costs(shape)
        rows, flood = measure(shape, args)
        s = SHAPES[shape]
        print(f"\n{shape}: {s['n_layer']} layers, {s['n_head']} heads, n_embd {s['n_embd']}, "
              f"block {s['block_size']}, float32")
        print(f"  one decoder step, in-process: alone {1e6 * steps['alone']:.0f} us, "
              f"{CONCURRENT} in a batch {1e6 * steps['batch']:.0f} us = "
              f"{CONCURRENT * steps['alone'] / steps['batch']:.2f}x the tokens/s (on the "
              f"NumPy references {1e6 * steps['batch_numpy']:.0f} us)")
        if args.compare:
            print(f"  --compare {args.compare}, in the same rounds:")
            report(rows["compare"])
            print("  this checkout:")
        report(rows["this"])
        if flood:
            after = flood["after"]
            print(f"  {BURST} requests at once ({args.burst_tokens} tokens each): "
                  f"{flood['statuses']} (status: count) in {flood['wall']:.1f} s; server RSS "
                  f"{flood['rss_before']:.0f} MB before, peak {flood['rss_peak']:.0f} MB, "
                  f"{flood['rss_after']:.0f} MB after; then one request: status "
                  f"{after['status']}, {after.get('tokens')} tokens", flush=True)
        ratio = statistics.median(rows["this"]["ratio"])
        ttft = statistics.median(rows["this"]["ttft_ratio"])
        if args.compare:
            summary_lines.append(f"  {shape:6} --compare: {CONCURRENT} streams "
                                 f"{statistics.median(rows['compare']['ratio']):.2f}x one alone")
        summary_lines.append(
            f"  {shape:6} {CONCURRENT} streams {ratio:.2f}x one alone (target >= "
            f"{TARGET_RATIO[shape]:g}x: {'met' if ratio >= TARGET_RATIO[shape] else 'NOT met'}); "
            f"first token while {CONCURRENT - 1} stream {ttft:.2f}x alone (target <= "
            f"{TARGET_TTFT_RATIO:g}x: {'met' if ttft <= TARGET_TTFT_RATIO else 'NOT met'})")
    print(f"\nsummary, medians of {args.rounds} rounds, {args.threads} BLAS thread(s):")
    print("\n".join(summary_lines), flush=True)


if __name__ == "__main__":
    main()
