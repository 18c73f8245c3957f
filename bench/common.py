"""What the benches share: a `python pensieve.py` to measure, its clients, the results file.

Imported as ``from common import ...`` by the scripts beside it (each runs
as ``python bench/NAME.py``, which puts bench/ on sys.path). No MLX at
import: local_once loads mlx-lm when called.
"""

import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "Write a long, detailed story about a dragon who learns to write software."
KEY = "bench-key"


# --- A server to measure ------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, port, path, log, name="server", timeout=300, poll=0.2):
    """Wait until ``GET path`` on ``port`` answers 200; raise if ``proc``
    (``name``, its output in ``log``) exits or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            ok = conn.getresponse().status == 200
            conn.close()
            if ok:
                return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{name} did not start; see {log.name}")
        time.sleep(poll)


def start_server(spec, log, extra=()):
    port = free_port()
    args = [sys.executable, str(ROOT / "pensieve.py"), "--port", str(port),
            "--api-key", KEY, *(["--model", spec] if spec else []), *extra]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_ready(proc, port, "/health", log)
    return proc, port


def stop_server(proc, log):
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"server ignored SIGTERM for 60 s; log kept at {log.name}")


# --- Clients ------------------------------------------------------------------


def stream(port, body):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/messages?beta=true", json.dumps(body),
                 {"x-api-key": KEY, "content-type": "application/json"})
    first, text, usage = None, [], {}
    for line in conn.getresponse():
        if not line.startswith(b"data: "):
            continue
        data = json.loads(line[6:])
        if data["type"] == "content_block_delta":
            first = first or time.perf_counter()
            text.append(data["delta"]["text"])
        elif data["type"] == "message_delta":
            usage = data["usage"]
    conn.close()
    return (first or time.perf_counter()) - start, "".join(text), usage


def get_json(port, path):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def proc_memory(pid, field="VmHWM"):
    """A process's memory from /proc, in bytes: VmHWM is the peak RSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def local_once(loaded, tokens, prompt=PROMPT):
    """One greedy generation with mlx-lm's stream_generate, timed."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    tok = loaded.tokenizer
    start = time.perf_counter()
    ids = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True,
        tokenize=False), add_special_tokens=False)
    first = last = None
    n = 0
    for r in stream_generate(loaded.model, tok, ids, max_tokens=tokens,
                             sampler=make_sampler(temp=0.0)):
        last = time.perf_counter()
        first = first or last
        n = r.generation_tokens
    return {"start": start, "first": first, "last": last, "tokens": n,
            "ttft": first - start, "tps": (n - 1) / (last - first), "prompt": len(ids)}


# --- Results ------------------------------------------------------------------


def publish(table, record):
    """Print a result table; with ``record``, append it to bench/RESULTS.md."""
    print(table)
    if record:
        results = ROOT / "bench" / "RESULTS.md"
        gap = "" if results.read_text().endswith("\n\n") else "\n"
        with open(results, "a") as f:
            f.write(gap + table + "\n")
