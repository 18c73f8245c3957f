"""Serving speed: Pensieve's HTTP API beside in-process mlx-lm and mlx_lm.server.

    .venv/bin/python bench/bench_serving.py [--model M] [--tokens 64] [--runs 3]
        [--concurrency 1,4,16] [--rounds 3] [--record]

One run, one machine, one model, greedy decoding, streaming everywhere:
  in-process      mlx-lm's stream_generate on the model as Pensieve loads it
                  (on the CPU: float32 with OpenBLAS, see engine/models.py);
  pensieve        `python pensieve.py`, Anthropic Messages API;
  mlx_lm.server   the same weights (on the CPU the same float32 copy, with the
                  same OpenBLAS preloaded), OpenAI chat completions API.
1. Single stream, --runs rounds of the three in turn after a warm-up: decode
   tok/s = (output tokens - 1) / (last token - first token), TTFT = request
   sent -> first text; medians, and the per-round ratio against in-process.
2. For each concurrency level N: N streams started together, each with its
   own prompt (a distinct first line, so no prompt cache can serve one from
   another), on each server in turn: aggregate tok/s (all output tokens /
   first request sent -> last token; the median of --rounds runs, the
   servers taking turns), per-stream decode tok/s and TTFT p50/p95 (pooled
   over the rounds). Each level runs once unmeasured first: MLX's CUDA backend compiles
   kernels for each new batch shape, seconds to a minute the first time.
--record appends the tables to bench/RESULTS.md.
"""

import argparse
import http.client
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import (KEY, PROMPT, free_port, local_once, publish,  # noqa: E402
                    start_server, stop_server, wait_ready)

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


# --- Clients ----------------------------------------------------------------------


def _timed_stream(port, path, body, headers, text_of, tokens_of):
    """POST a streaming request; read SSE ``data:`` lines until the end."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    start = time.perf_counter()
    conn.request("POST", path, json.dumps(body),
                 {"content-type": "application/json", **headers})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {response.read()[:300]!r}")
    first = last = None
    tokens = None
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        data = json.loads(line[6:])
        if text_of(data):
            last = time.perf_counter()
            first = first or last
        tokens = tokens_of(data) or tokens
    conn.close()
    return {"start": start, "first": first, "last": last, "tokens": tokens,
            "ttft": first - start,
            "tps": (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0}


def anthropic_stream(port, prompt, tokens):
    body = {"model": "bench", "max_tokens": tokens, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}
    return _timed_stream(
        port, "/v1/messages", body, {"x-api-key": KEY},
        lambda d: d["type"] == "content_block_delta" and d["delta"].get("text"),
        lambda d: d["usage"]["output_tokens"] if d["type"] == "message_delta" else None)


def openai_stream(port, prompt, tokens):
    body = {"model": "default_model", "max_tokens": tokens, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}
    return _timed_stream(
        port, "/v1/chat/completions", body, {},
        lambda d: d.get("choices") and d["choices"][0].get("delta", {}).get("content"),
        lambda d: (d.get("usage") or {}).get("completion_tokens"))


def concurrent(call, port, n, tokens):
    """``n`` streams at once, each its own prompt; their results. A connection
    the server resets before answering (a full listen backlog) is retried at
    once, its time counted in that stream's TTFT; ``retried`` counts them."""
    results = [None] * n
    errors = []
    retried = []
    barrier = threading.Barrier(n)

    def one(i):
        prompt = f"Request {secrets.token_hex(4)}. {PROMPT}"
        barrier.wait()
        start = time.perf_counter()
        try:
            for attempt in range(50):
                try:
                    results[i] = call(port, prompt, tokens)
                    break
                except ConnectionResetError:
                    retried.append(i)
                    time.sleep(0.01)
            results[i]["ttft"] += results[i]["start"] - start
            results[i]["start"] = start
        except Exception as e:  # reported after the others finish
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for r in results:
        r["retried"] = len(retried)
    return results


# --- Servers -----------------------------------------------------------------------


def start_peer(model_dir, log, cpu):
    port = free_port()
    env = dict(os.environ)
    if cpu and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS  # the BLAS Pensieve loads for itself
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model",
                             str(model_dir), "--port", str(port), "--log-level",
                             "WARNING"], stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_ready(proc, port, "/v1/models", log, "mlx_lm.server", timeout=600, poll=0.5)
    return proc, port


def peer_model_dir(loaded, location, out):
    """The weights mlx_lm.server should run to do the same arithmetic: on the
    CPU, Pensieve's float32 copy; elsewhere the model as stored."""
    if loaded.device != "cpu" or not loaded.weights.startswith("float32"):
        return location
    import mlx.core as mx
    from mlx.utils import tree_flatten

    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"),
                        dict(tree_flatten(loaded.model.parameters())))
    config = json.loads((location / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    for f in location.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


# --- The run ---------------------------------------------------------------------


def median(rows, key):
    return statistics.median(r[key] for r in rows)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="as pensieve.py --model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured runs of each concurrency level per server")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]

    from engine.models import load, resolve

    loaded = load(args.model)  # OpenBLAS before MLX, float32 on CPU: as the server does
    location, _ = resolve(args.model)
    work = Path(tempfile.mkdtemp(prefix="pensieve-bench-"))
    peer_dir = peer_model_dir(loaded, location, work / "peer-model")
    logs = {name: open(work / f"{name}.log", "w+") for name in ("pensieve", "peer")}
    servers = {}
    try:
        servers["pensieve"] = start_server(args.model, logs["pensieve"])
        servers["peer"] = start_peer(peer_dir, logs["peer"], loaded.device == "cpu")
        paths = {"in-process mlx-lm": lambda p, t: local_once(loaded, t, p),
                 "pensieve (HTTP)": lambda p, t: anthropic_stream(
                     servers["pensieve"][1], p, t),
                 "mlx_lm.server (HTTP)": lambda p, t: openai_stream(
                     servers["peer"][1], p, t)}
        single = {name: [] for name in paths}
        for round_ in range(args.runs + 1):  # the first round warms up
            for name, call in paths.items():
                r = call(PROMPT, args.tokens)
                print(f"single {name}: {r['tps']:.1f} tok/s, ttft "
                      f"{r['ttft'] * 1000:.0f} ms", flush=True)
                if round_:
                    single[name].append(r)
        levels_out = []
        servers_by_name = (("pensieve", anthropic_stream, servers["pensieve"][1]),
                           ("mlx_lm.server", openai_stream, servers["peer"][1]))
        for n in levels:
            for _, call, port in servers_by_name:
                concurrent(call, port, n, min(args.tokens, 8))  # warm-up
            runs = {name: [] for name, _, _ in servers_by_name}
            for _ in range(args.rounds):  # the servers in turn, each round
                for name, call, port in servers_by_name:
                    runs[name].append(concurrent(call, port, n, args.tokens))
            for name, rounds in runs.items():
                aggregates = [sum(r["tokens"] for r in results)
                              / (max(r["last"] for r in results)
                                 - min(r["start"] for r in results))
                              for results in rounds]
                pooled = [r for results in rounds for r in results]
                row = {"server": name, "n": n,
                       "aggregate": statistics.median(aggregates),
                       "per_stream": statistics.median(r["tps"] for r in pooled),
                       "ttft50": percentile([r["ttft"] for r in pooled], 0.5),
                       "ttft95": percentile([r["ttft"] for r in pooled], 0.95),
                       "retried": sum(results[0]["retried"] for results in rounds)}
                print(row, flush=True)
                levels_out.append(row)
    finally:
        for name, (proc, _) in servers.items():
            stop_server(proc, logs[name])
        shutil.rmtree(work, ignore_errors=True)
    publish(report(args, loaded, single, levels_out), args.record)


def report(args, loaded, single, levels):
    inproc = single["in-process mlx-lm"]
    ours = single["pensieve (HTTP)"]
    peer = single["mlx_lm.server (HTTP)"]
    ratio = statistics.median(o["tps"] / i["tps"] for o, i in zip(ours, inproc))
    ratio_peer = statistics.median(o["tps"] / p["tps"] for o, p in zip(ours, peer))
    machine = (f"{platform.machine()} {os.cpu_count()} cores, {loaded.device}, "
               f"{loaded.weights}")
    lines = [f"### {date.today()} — {loaded.name}, {machine}", "",
             f"`{' '.join(['bench/bench_serving.py'] + sys.argv[1:])}` — prompt "
             f"{inproc[0]['prompt']} tokens, up to {args.tokens} output tokens, greedy, "
             "streaming; mlx_lm.server on the same weights"
             + (" (the float32 copy, OpenBLAS preloaded)" if loaded.device == "cpu"
                else ""), "",
             "**Single stream** (medians of {} rounds after a warm-up)".format(args.runs),
             "", "| path | decode tok/s | TTFT ms |", "|---|---|---|"]
    for name, rows in single.items():
        lines.append(f"| {name} | {median(rows, 'tps'):.1f} | "
                     f"{median(rows, 'ttft') * 1000:.0f} |")
    lines += ["",
              f"- pensieve / in-process decode, median of per-round ratios: "
              f"**{ratio:.3f}**; pensieve / mlx_lm.server: **{ratio_peer:.3f}**", "",
              f"**Concurrent streams** (all started together, distinct prompts; "
              f"{args.rounds} rounds)", "",
              "| streams | server | aggregate tok/s | per-stream tok/s | TTFT p50 ms "
              "| TTFT p95 ms |", "|---|---|---|---|---|---|"]
    for row in levels:
        note = (f" ({row['retried']} connections reset, retried)" if row["retried"]
                else "")
        lines.append(f"| {row['n']} | {row['server']}{note} | {row['aggregate']:.1f} | "
                     f"{row['per_stream']:.1f} | {row['ttft50'] * 1000:.0f} | "
                     f"{row['ttft95'] * 1000:.0f} |")
    top = max(r["n"] for r in levels)
    ours_top = next(r for r in levels if r["n"] == top and r["server"] == "pensieve")
    peer_top = next(r for r in levels if r["n"] == top and r["server"] != "pensieve")
    ours_one = next((r for r in levels if r["n"] == 1 and r["server"] == "pensieve"), None)
    lines += ["", f"- aggregate at {top} streams, pensieve / mlx_lm.server: "
              f"**{ours_top['aggregate'] / peer_top['aggregate']:.2f}**"]
    if ours_one:
        lines.append(f"- pensieve aggregate at {top} streams / at 1 stream: "
                     f"**{ours_top['aggregate'] / ours_one['aggregate']:.1f}x**")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
