"""gpt.serve's speed on loopback: tokens/s of one stream and of 4 concurrent streams, and the
time to first token, beside gpt.sample's generate() in a plain process (no HTTP) for scale.

A server subprocess (127.0.0.1, a free port) serves a random-init model of the default
`python -m gpt.train` shape (4 layers, 8 heads, n_embd 128, block 64, a 67-token char
vocabulary, float32); sampling never draws EOS, so every request streams exactly the tokens
it asks for. Each round runs, in turn: generate() in this process, one stream, and
4 streams at once (each request: a 7-character prompt, `--tokens` tokens, temperature 1, its
own seed). We print medians and [min-max] over the rounds, the CPU and a measured sgemm peak.

    python benchmarks/serve.py                      # 5 rounds of 256 tokens, 1 BLAS thread
    python benchmarks/serve.py --rounds 3 --tokens 128 --threads 2
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
from gpt.sample import generate
from gpt.serve import SAMPLING_THREADS
from gpt.tokenizer import CharTokenizer

PROMPT = "THE SEA"  # the vocabulary is chr(32)..chr(96): capitals, digits, punctuation


def benchmark_tokenizer() -> CharTokenizer:
    return CharTokenizer([chr(c) for c in range(32, 97)])  # 65 printable characters


def benchmark_model() -> GPT:
    cfg = GPTConfig(vocab_size=benchmark_tokenizer().vocab_size, block_size=64, n_layer=4,
                    n_head=8, n_embd=128)
    return GPT(cfg, dtype=np.float32, seed=0)


def serve_forever(threads: int) -> None:
    """The server subprocess: print the URL, serve until stdin closes."""
    from gpt.serve import create_app, running

    tensorlite.set_num_threads(threads)
    app = create_app(benchmark_model(), benchmark_tokenizer(), "bench", max_tokens=100_000)
    with running(app) as url:
        print(url, flush=True)
        sys.stdin.read()  # the parent closes our stdin to stop us


# ---- the client side ---------------------------------------------------------------------------
def stream_once(url: str, tokens: int, seed: int) -> dict:
    """One streamed completion: seconds to the first text chunk and to the end, and tokens."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    body = json.dumps({"prompt": PROMPT, "max_tokens": tokens, "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    first, usage = None, None
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        for line in r:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    finally:
        conn.close()
    return {"ttft": first, "seconds": time.perf_counter() - t0,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per request")
    ap.add_argument("--streams", type=int, default=4, help="concurrent streams")
    ap.add_argument("--threads", type=int, default=SAMPLING_THREADS,
                    help="BLAS threads, in the server and for generate() (default: gpt.serve's)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    args = ap.parse_args()
    if args.serve:
        return serve_forever(args.threads)
    tensorlite.set_num_threads(args.threads)

    model, tok = benchmark_model(), benchmark_tokenizer()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--threads",
                               str(args.threads)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), f"the server did not start: {url!r}"
        stream_once(url, 8, 0)  # warm-up
        rows: dict[str, list[float]] = {k: [] for k in (
            "direct", "one", "one_ttft", "many_total", "many_each", "many_ttft")}
        for r in range(args.rounds):
            t0 = time.perf_counter()
            generate(model, tok, PROMPT, args.tokens, seed=r)
            rows["direct"].append(args.tokens / (time.perf_counter() - t0))
            one = stream_once(url, args.tokens, seed=r)
            rows["one"].append(one["tokens"] / one["seconds"])
            rows["one_ttft"].append(1e3 * one["ttft"])
            wall, many = concurrent(url, args.tokens, args.streams, seed=100 * r)
            rows["many_total"].append(sum(m["tokens"] for m in many) / wall)
            rows["many_each"].append(statistics.median(m["tokens"] / m["seconds"] for m in many))
            rows["many_ttft"].append(statistics.median(1e3 * m["ttft"] for m in many))
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; sgemm peak {sgemm_peak():.0f} GFLOP/s "
          f"(512^3 float32, {args.threads} thread(s))")
    print(f"model: 4 layers, 8 heads, n_embd 128, block 64, vocab {tok.vocab_size}, float32; "
          f"{args.threads} BLAS thread(s); {args.tokens} tokens per request; {args.rounds} "
          "rounds, median [min-max]")
    print(f"  generate() in-process, no HTTP     {summary(rows['direct'])} tokens/s")
    print(f"  1 stream                           {summary(rows['one'])} tokens/s, "
          f"first token after {summary(rows['one_ttft'], '.1f')} ms")
    print(f"  {args.streams} concurrent streams, all together {summary(rows['many_total'])} "
          f"tokens/s")
    print(f"  {args.streams} concurrent streams, each        {summary(rows['many_each'])} "
          f"tokens/s, first token after {summary(rows['many_ttft'], '.1f')} ms")


if __name__ == "__main__":
    main()
