"""Soak test: many clients, good and bad, against one Pensieve server for a while.

    .venv/bin/python bench/soak.py [--clients 8] [--minutes 5] [--max-requests 2000]
        [--seed 1] [--model M] [--prompt-cache-mb 64] [--record]

Starts `python pensieve.py --host 127.0.0.1 --port P --prompt-cache-mb MB` (a
free port; loopback only: the script refuses any other target), waits for
/health, warms it up, then runs --clients threads until --minutes pass or
--max-requests actions have started. Each thread picks one action at a time,
with the fixed weights of ACTIONS:

  good        a message, a stream read to message_stop, count_tokens, /health
              twice on one connection, the next turn of a conversation (its
              earlier turns come back from the prompt cache);
  disconnect  a stream dropped after 1-5 events; a whole request sent and the
              socket closed at once (while queued or in prefill);
  stall       half a request head, or a head and part of its body, then
              silence and a close; a stream nobody reads for seconds;
  bad         malformed JSON, fields of the wrong type, a wrong API key,
              garbage bytes, a head over 64 KiB, a non-JSON content type, an
              unknown path, a foreign Host header, a foreign Origin.

Every socket has a timeout and every action a time bound, so the script
cannot hang. An action's outcome is the HTTP status and Anthropic error type,
"message_stop" or the error event ending a stream, or what became of the
connection (closed, reset, timeout, abandoned by us). An outcome outside the
action's expected set is a failure: a 5xx, a good request not answered 200
(529 overloaded excepted), a bad request accepted, a timeout. So are requests
still running once the clients stop, a traceback in the server's log, RSS
growing by more than the prompt cache bound plus RSS_SLACK_MB, and a non-zero
exit after SIGTERM. The summary is a markdown table; --record appends it to
bench/RESULTS.md. The exit status is 1 when anything failed.
"""

import argparse
import http.client
import ipaddress
import json
import os
import platform
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KEY, free_port, publish, wait_ready  # noqa: E402

HOST = "127.0.0.1"
MIB = 1024 * 1024
# A good request on 2 CPU cores at ~14 tok/s, behind a batch of others, ends
# well inside this; past it the request counts as a timeout.
GOOD_TIMEOUT_S = 120
# The server answers a bad request from its head or body at once.
RAW_TIMEOUT_S = 15
# Misbehaving clients stall this long (seconds, drawn uniformly): shorter than
# the server's 30 s head timeout, so each stall ends with our close.
STALL_S = (1.0, 5.0)
# One over the server's 64 KiB head limit.
BIG_HEADER_BYTES = 65 * 1024
# Turns a conversation grows to before it starts again.
MAX_TURNS = 6
# RSS may grow beyond the prompt cache's bound by this much: a batch's working
# set and the buffers MLX's allocator keeps for reuse (measured: 76 MiB with
# the cache off, 4 clients, SmolLM2-135M on the CPU).
RSS_SLACK_MB = 128
# After the clients stop, the engine has this long to drop abandoned requests.
SETTLE_S = 15
PROGRESS_S = 15

TOPICS = ["owls", "rivers", "bread", "chess", "rain", "copper", "lanterns", "maps",
          "tea", "glaciers", "violins", "ants", "harbors", "clocks", "moss", "kites"]
ASKS = ["Say one thing about", "Name a color for", "Write three words on",
        "Give a short fact about", "Rhyme with"]


# --- Requests ------------------------------------------------------------------


def check_loopback(host):
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"soak: refusing non-loopback target {host}")


def prompt(rng):
    return f"{rng.choice(ASKS)} {rng.choice(TOPICS)}. ({rng.randrange(10**6)})"


def body(rng, messages=None, stream=False, max_tokens=None):
    return {"model": "soak", "stream": stream,
            "max_tokens": max_tokens or rng.randint(4, 16),
            "temperature": rng.choice((0, 1)),
            "messages": messages or [{"role": "user", "content": prompt(rng)}]}


def raw_request(port, path, payload, headers=(), host=None):
    """A POST's bytes, by hand: for the cases http.client will not send."""
    if not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    lines = [f"POST {path} HTTP/1.1", f"host: {host or f'{HOST}:{port}'}"]
    names = {k.lower() for k, _ in headers}
    if "content-type" not in names:
        lines.append("content-type: application/json")
    if "x-api-key" not in names:
        lines.append(f"x-api-key: {KEY}")
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"content-length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def connect(port, timeout=RAW_TIMEOUT_S, rcvbuf=None):
    check_loopback(HOST)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # set before connecting, so the window starts small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((HOST, port))
    return sock


def hang_up(sock, rng):
    """Close, half the time with a reset (SO_LINGER 0) instead of a FIN."""
    if rng.random() < 0.5:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_head(sock):
    """(status, head lines, bytes after the head); status None if closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, [], data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), lines[1:], rest


def read_response(sock):
    """(status, body) of one response framed by Content-Length."""
    status, lines, body = read_head(sock)
    length = next((int(line.split(":", 1)[1]) for line in lines
                   if line.lower().startswith("content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def describe(status, payload=b""):
    """An answer as an outcome: "closed", "200", "400 invalid_request_error"."""
    if status is None:
        return "closed"
    try:
        data = json.loads(payload) if isinstance(payload, bytes) else payload
        return f"{status} {data['error']['type']}"
    except (ValueError, TypeError, KeyError):
        return str(status)


def exchange(port, data):
    """Send ``data`` on a fresh connection; the answer as an outcome."""
    with connect(port) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before all was sent: read the answer
        return describe(*read_response(sock))


def wait_then_close(sock, rng, seconds):
    """Stay silent for ``seconds``; the server's answer meanwhile, if any."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
        if not data:
            outcome = "closed"
        elif data.startswith(b"HTTP/1.1 ") and data[9:12].isdigit():
            outcome = describe(int(data[9:12]), data.partition(b"\r\n\r\n")[2])
        else:
            outcome = f"answered {data[:20]!r}"
    except TimeoutError:
        outcome = "abandoned"
    hang_up(sock, rng)
    return outcome


def post(port, path, payload, timeout=GOOD_TIMEOUT_S):
    """A well-formed POST through http.client: (status, JSON body or None)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(payload),
                     {"x-api-key": KEY, "content-type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, None


# --- Actions: each returns its outcome -------------------------------------------


class Client:
    """One thread's state: its random stream and its conversation so far."""

    def __init__(self, port, rng, tally):
        self.port, self.rng, self.tally = port, rng, tally
        self.history = []


def message(c):
    status, data = post(c.port, "/v1/messages", body(c.rng))
    if status == 200 and (data or {}).get("type") != "message":
        return "bad body (200)"
    return describe(status, data)


def stream(c):
    deadline = time.monotonic() + GOOD_TIMEOUT_S
    conn = http.client.HTTPConnection(HOST, c.port, timeout=GOOD_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/messages", json.dumps(body(c.rng, stream=True)),
                     {"x-api-key": KEY, "content-type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return describe(response.status, response.read())
        event = None
        for line in response:
            if time.monotonic() > deadline:
                return "timeout"
            if line.startswith(b"event: "):
                event = line[7:].strip().decode()
            elif line.startswith(b"data: ") and event == "error":
                return f"200 error {describe(200, line[6:]).split()[-1]}"
            elif event == "message_stop":
                return "200 message_stop"
        return "200 truncated"
    finally:
        conn.close()


def count_tokens(c):
    payload = {"model": "soak", "messages": [{"role": "user", "content": prompt(c.rng)}]}
    status, data = post(c.port, "/v1/messages/count_tokens", payload)
    if status == 200 and not isinstance((data or {}).get("input_tokens"), int):
        return "bad body (200)"
    return describe(status, data)


def health(c):
    """Two GETs on one connection: the keep-alive cycle as well."""
    conn = http.client.HTTPConnection(HOST, c.port, timeout=RAW_TIMEOUT_S)
    try:
        for _ in range(2):
            conn.request("GET", "/health")
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                return describe(response.status, data)
        return "200"
    finally:
        conn.close()


def multi_turn(c):
    """The next turn of this client's conversation, its last turn marked for
    caching half the time; prompt-cache reuse is tallied."""
    if not c.history or len(c.history) >= 2 * MAX_TURNS:
        c.history = []
    content = [{"type": "text", "text": prompt(c.rng)}]
    if c.rng.random() < 0.5:
        content[0]["cache_control"] = {"type": "ephemeral"}
    c.history.append({"role": "user", "content": content})
    status, data = post(c.port, "/v1/messages", body(c.rng, messages=c.history))
    if status != 200 or (data or {}).get("type") != "message":
        c.history = []
        return "bad body (200)" if status == 200 else describe(status, data)
    text = "".join(b.get("text", "") for b in data["content"]).strip() or "OK."
    c.history.append({"role": "assistant", "content": text})
    c.tally.cache_use(data["usage"], len(c.history) > 2)
    return "200"


def stream_then_close(c):
    with connect(c.port, GOOD_TIMEOUT_S) as sock:
        sock.sendall(raw_request(c.port, "/v1/messages", body(c.rng, stream=True)))
        status, _, seen = read_head(sock)
        if status != 200:
            return describe(status, seen)
        want = c.rng.randint(1, 5)
        while seen.count(b"\n\n") < want and b"message_stop" not in seen:
            chunk = sock.recv(65536)
            if not chunk:
                return "200 closed by server"
            seen += chunk
        hang_up(sock, c.rng)
        return "200 dropped by us"


def send_then_close(c):
    """A whole request with a longer prompt, dropped while queued or in prefill."""
    words = " ".join(c.rng.choice(TOPICS) for _ in range(c.rng.randint(20, 200)))
    payload = body(c.rng, [{"role": "user", "content": f"Sort: {words}"}],
                   stream=c.rng.random() < 0.5)
    with connect(c.port) as sock:
        sock.sendall(raw_request(c.port, "/v1/messages", payload))
        time.sleep(c.rng.uniform(0, 0.5))
        hang_up(sock, c.rng)
    return "sent"


def half_head(c):
    data = raw_request(c.port, "/v1/messages", body(c.rng))
    head_end = data.index(b"\r\n\r\n")
    sock = connect(c.port)
    sock.sendall(data[:c.rng.randint(1, head_end)])
    return wait_then_close(sock, c.rng, c.rng.uniform(*STALL_S))


def partial_body(c):
    data = raw_request(c.port, "/v1/messages", body(c.rng))
    body_start = data.index(b"\r\n\r\n") + 4
    sock = connect(c.port)
    sock.sendall(data[:c.rng.randint(body_start, len(data) - 1)])
    return wait_then_close(sock, c.rng, c.rng.uniform(*STALL_S))


def slow_reader(c):
    """A stream into a 2 KiB receive window, not read for seconds, then read
    for at most a second more and dropped."""
    with connect(c.port, GOOD_TIMEOUT_S, rcvbuf=2048) as sock:
        sock.sendall(raw_request(c.port, "/v1/messages", body(c.rng, stream=True)))
        time.sleep(c.rng.uniform(*STALL_S))
        status, _, seen = read_head(sock)
        if status != 200:
            return describe(status, seen)
        sock.settimeout(1)
        try:
            while b"message_stop" not in seen and b"event: error" not in seen:
                chunk = sock.recv(65536)
                if not chunk:
                    return "200 slow, closed by server"
                seen += chunk
        except TimeoutError:
            pass
        hang_up(sock, c.rng)
        if b"event: error" in seen:
            return "200 slow, error event"
        return "200 slow, complete" if b"message_stop" in seen else "200 slow, partial"


def bad_json(c):
    return exchange(c.port, raw_request(c.port, "/v1/messages",
                                        b'{"model": "soak", "messages": [{'))


def wrong_type(c):
    payload = body(c.rng)
    field, value = c.rng.choice([("max_tokens", -1), ("max_tokens", "ten"),
                                 ("messages", "x"), ("temperature", 5),
                                 ("stream", "yes"), ("model", 7)])
    payload[field] = value
    return exchange(c.port, raw_request(c.port, "/v1/messages", payload))


def wrong_key(c):
    return exchange(c.port, raw_request(c.port, "/v1/messages", body(c.rng),
                                        [("x-api-key", "not-the-key")]))


def garbage(c):
    noise = bytes(c.rng.randrange(256) for _ in range(c.rng.randint(1, 2048)))
    return exchange(c.port, noise + b"\r\n\r\n")


def big_header(c):
    return exchange(c.port, raw_request(c.port, "/v1/messages", body(c.rng),
                                        [("x-pad", "a" * BIG_HEADER_BYTES)]))


def text_content_type(c):
    ctype = c.rng.choice(["text/plain", "application/x-www-form-urlencoded",
                          "multipart/form-data; boundary=x"])
    return exchange(c.port, raw_request(c.port, "/v1/messages", body(c.rng, max_tokens=4),
                                        [("content-type", ctype)]))


def unknown_path(c):
    path = c.rng.choice(["/v1/complete", "/v2/messages", "/admin", "/v1/messages/x"])
    return exchange(c.port, raw_request(c.port, path, body(c.rng)))


def foreign_host(c):
    host = c.rng.choice(["evil.example", f"evil.example:{c.port}",
                         f"127.0.0.1.nip.io:{c.port}", "10.0.0.1"])
    return exchange(c.port, raw_request(c.port, "/v1/messages", body(c.rng, max_tokens=4),
                                        host=host))


def foreign_origin(c):
    origin = c.rng.choice(["http://evil.example", "https://attacker.test", "null"])
    return exchange(c.port, raw_request(c.port, "/v1/messages", body(c.rng, max_tokens=4),
                                        [("origin", origin)]))


# (action, kind, weight, expected outcomes). An outcome is expected when it
# equals one of these or starts with one and a space ("403" admits any 403).
ACTIONS = [
    (message, "good", 14, ("200", "529")),
    (stream, "good", 14, ("200 message_stop", "529", "200 error overloaded_error")),
    (count_tokens, "good", 6, ("200",)),
    (health, "good", 4, ("200",)),
    (multi_turn, "good", 10, ("200", "529")),
    (stream_then_close, "disconnect", 6, ("200 dropped by us", "529")),
    (send_then_close, "disconnect", 6, ("sent",)),
    (half_head, "stall", 3, ("abandoned", "closed", "408")),
    (partial_body, "stall", 3, ("abandoned", "closed", "408")),
    (slow_reader, "stall", 3, ("200 slow, complete", "200 slow, partial",
                               "200 slow, closed by server", "529")),
    (bad_json, "bad", 3, ("400 invalid_request_error",)),
    (wrong_type, "bad", 3, ("400 invalid_request_error",)),
    (wrong_key, "bad", 3, ("401 authentication_error",)),
    (garbage, "bad", 2, ("400", "closed", "reset")),
    (big_header, "bad", 2, ("431", "400", "closed", "reset")),
    (text_content_type, "bad", 2, ("415",)),
    (unknown_path, "bad", 2, ("404 not_found_error",)),
    (foreign_host, "bad", 2, ("403",)),
    (foreign_origin, "bad", 2, ("403",)),
]


def expected(outcome, allowed):
    return any(outcome == a or outcome.startswith(a + " ") for a in allowed)


# --- The run -----------------------------------------------------------------------


class Tally:
    """Counts shared by the client threads, behind one lock."""

    def __init__(self, max_requests, end):
        self.lock = threading.Lock()
        self.left, self.end = max_requests, end
        self.outcomes = defaultdict(Counter)
        self.failures = []
        self.cache = Counter()
        self.started = time.monotonic()

    def take(self):
        with self.lock:
            if self.left <= 0 or time.monotonic() >= self.end:
                return False
            self.left -= 1
            return True

    def record(self, client, action, outcome, ok, detail=""):
        with self.lock:
            self.outcomes[action][outcome] += 1
            if not ok:
                self.failures.append(f"{time.monotonic() - self.started:6.1f} s client "
                                     f"{client}: {action} -> {outcome}{detail}")

    def cache_use(self, usage, later_turn):
        if not later_turn:
            return
        with self.lock:
            self.cache["prompt"] += (usage["input_tokens"] + usage["cache_read_input_tokens"]
                                     + usage["cache_creation_input_tokens"])
            self.cache["read"] += usage["cache_read_input_tokens"]


def run_action(client, index, func, allowed):
    try:
        outcome, detail = func(client), ""
    except TimeoutError:
        outcome, detail = "timeout", ""
    except ConnectionResetError:
        outcome, detail = "reset", ""
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        outcome, detail = "closed", f" ({type(e).__name__}: {e})"
    except Exception as e:  # a bug here, not in the server: show it
        traceback.print_exc()
        outcome, detail = "script error", f" ({type(e).__name__}: {e})"
    client.tally.record(index, func.__name__, outcome, expected(outcome, allowed), detail)


def client_loop(index, port, seed, tally):
    rng = random.Random(seed * 1000 + index)
    client = Client(port, rng, tally)
    weights = [w for _, _, w, _ in ACTIONS]
    while tally.take():
        func, _, _, allowed = rng.choices(ACTIONS, weights)[0]
        run_action(client, index, func, allowed)


def rss(pid, field="VmRSS"):
    """A process's memory from /proc, in bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def get_health(port):
    conn = http.client.HTTPConnection(HOST, port, timeout=RAW_TIMEOUT_S)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def start_server(args, log):
    port = free_port()
    cmd = [sys.executable, str(ROOT / "pensieve.py"), "--host", HOST, "--port",
           str(port), "--api-key", KEY, "--prompt-cache-mb", str(args.prompt_cache_mb),
           *(["--model", args.model] if args.model else [])]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_ready(proc, port, "/health", log, timeout=600)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port


def stop_server(proc):
    """SIGTERM, then wait: (exit code, seconds to exit); killed after 60 s."""
    start = time.monotonic()
    proc.terminate()
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = f"killed after ignoring SIGTERM for 60 s ({proc.wait()})"
    return code, time.monotonic() - start


def soak(args, proc, port):
    """Warm up, run the clients, settle; the figures for the report."""
    warm = Client(port, random.Random(args.seed), None)
    for func in (message, stream):
        outcome = func(warm)
        if outcome not in ("200", "200 message_stop"):
            raise RuntimeError(f"warm-up {func.__name__} failed: {outcome}")
    time.sleep(1)
    r = {"rss_start": rss(proc.pid), "health_start": get_health(port)}
    peak = [r["rss_start"]]
    tally = Tally(args.max_requests, time.monotonic() + args.minutes * 60)
    threads = [threading.Thread(target=client_loop, args=(i, port, args.seed, tally),
                                daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    last = time.monotonic()
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        peak.append(rss(proc.pid))
        if proc.poll() is not None:
            tally.record("-", "server", f"exited with {proc.returncode}", False)
            tally.end = 0  # no new actions; those in flight fail fast
            break
        if time.monotonic() - last >= PROGRESS_S:
            last = time.monotonic()
            done = sum(sum(c.values()) for c in tally.outcomes.values())
            print(f"{last - tally.started:5.0f} s: {done} actions, "
                  f"{len(tally.failures)} failures, RSS {peak[-1] / MIB:.0f} MiB",
                  flush=True)
    deadline = time.monotonic() + GOOD_TIMEOUT_S + 10
    for t in threads:
        t.join(max(0, deadline - time.monotonic()))
    r["duration"] = time.monotonic() - tally.started
    r["health"] = settle(port, tally)
    r["rss_end"], r["rss_peak"] = rss(proc.pid), max(peak + [rss(proc.pid)])
    r["rss_hwm"] = rss(proc.pid, "VmHWM")
    r["tally"] = tally
    return r


def settle(port, tally):
    """/health once nothing is running or waiting; a failure if that never comes."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            health = get_health(port)
        except (OSError, ValueError) as e:
            tally.record("-", "final /health", f"failed ({type(e).__name__}: {e})", False)
            return {}
        busy = health.get("running", 0) + health.get("waiting", 0)
        if not busy:
            return health
        if time.monotonic() > deadline:
            tally.record("-", "final /health", f"{busy} requests still running or "
                         f"waiting {SETTLE_S} s after the clients stopped", False)
            return health
        time.sleep(0.5)


def server_log_problems(path):
    lines = Path(path).read_text(errors="replace").splitlines()
    return [line for line in lines
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]


# --- The report --------------------------------------------------------------------


def report(args, r, exit_code, shutdown_s, log_problems, log_path):
    tally, health, before = r["tally"], r["health"], r["health_start"]
    bound = args.prompt_cache_mb
    growth = (r["rss_end"] - r["rss_start"]) / MIB
    if growth > bound + RSS_SLACK_MB:
        tally.record("-", "memory", f"RSS grew {growth:.0f} MiB, more than the "
                     f"{bound} MiB cache bound + {RSS_SLACK_MB} MiB", False)
    if exit_code != 0:
        tally.record("-", "shutdown", f"exit code {exit_code} after SIGTERM", False)
    for line in log_problems[:20]:
        tally.record("-", "server log", line, False)
    total = sum(sum(c.values()) for c in tally.outcomes.values())
    good = [f.__name__ for f, kind, _, _ in ACTIONS if kind == "good"]
    served = sum(tally.outcomes[a][o] for a in good for o in tally.outcomes[a]
                 if o in ("200", "200 message_stop"))
    machine = f"{platform.machine()} {os.cpu_count()} cores, {health.get('device', '?')}"
    lines = [f"### {date.today()} — soak, {health.get('model', '?')}, {machine}", "",
             f"`{' '.join(['bench/soak.py'] + sys.argv[1:])}` — {args.clients} clients "
             f"for up to {args.minutes:g} min or {args.max_requests} actions, seed "
             f"{args.seed}; prompt cache bound {bound} MiB", "",
             "| action | kind | runs | outcomes | unexpected |", "|---|---|---|---|---|"]
    for func, kind, _, allowed in ACTIONS:
        counts = tally.outcomes.get(func.__name__, Counter())
        bad = sum(n for o, n in counts.items() if not expected(o, allowed))
        shown = ", ".join(f"{o} ×{n}" for o, n in counts.most_common())
        lines.append(f"| {func.__name__} | {kind} | {sum(counts.values())} | "
                     f"{shown or '—'} | {bad or ''} |")
    reused = (f"{tally.cache['read']} of {tally.cache['prompt']} prompt tokens "
              f"({100 * tally.cache['read'] / tally.cache['prompt']:.0f}%)"
              if tally.cache["prompt"] else "none (no later turns)")
    lines += ["",
              f"- {total} actions in {r['duration']:.0f} s; good requests served "
              f"(200, streams to message_stop): **{served}**; failures: "
              f"**{len(tally.failures)}**",
              f"- later turns of conversations read from the prompt cache: {reused}",
              f"- server RSS: start {r['rss_start'] / MIB:.0f} MiB (after warm-up), peak "
              f"{r['rss_peak'] / MIB:.0f}, end {r['rss_end'] / MIB:.0f}: growth "
              f"**{growth:.0f} MiB** (cache bound {bound} MiB; VmHWM "
              f"{r['rss_hwm'] / MIB:.0f} MiB, model load included)",
              f"- /health at the end: running {health.get('running', '?')}, waiting "
              f"{health.get('waiting', '?')}, prompt cache "
              f"{health.get('prompt_cache_entries', '?')} entries, "
              f"{health.get('prompt_cache_bytes', 0) / MIB:.0f} MiB; MLX active "
              f"{before.get('memory_active_bytes', 0) / MIB:.0f} MiB after warm-up, "
              f"{health.get('memory_active_bytes', 0) / MIB:.0f} MiB at the end; MLX "
              f"buffer cache {health.get('memory_buffer_cache_bytes', 0) / MIB:.0f} MiB "
              "at the end",
              f"- SIGTERM: exit code {exit_code} after {shutdown_s:.1f} s; server log: "
              + (f"{len(log_problems)} error lines ({log_path})" if log_problems
                 else "no tracebacks or errors")]
    if tally.failures:
        lines += ["", "Failures:", ""] + [f"    {f}" for f in tally.failures[:30]]
        if len(tally.failures) > 30:
            lines.append(f"    ... and {len(tally.failures) - 30} more")
    lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--max-requests", type=int, default=2000,
                        help="actions started, all clients together")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", default=None, help="as pensieve.py --model")
    parser.add_argument("--prompt-cache-mb", type=int, default=64)
    parser.add_argument("--record", action="store_true",
                        help="append the summary to bench/RESULTS.md")
    args = parser.parse_args()
    check_loopback(HOST)

    log = tempfile.NamedTemporaryFile("w+", prefix="pensieve-soak-", suffix=".log",
                                      delete=False)
    print(f"server log: {log.name}", flush=True)
    proc, port = start_server(args, log)
    try:
        result = soak(args, proc, port)
    finally:
        exit_code, shutdown_s = stop_server(proc)
    problems = server_log_problems(log.name)
    publish(report(args, result, exit_code, shutdown_s, problems, log.name), args.record)
    return 1 if result["tally"].failures else 0


if __name__ == "__main__":
    sys.exit(main())
