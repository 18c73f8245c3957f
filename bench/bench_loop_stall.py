"""How long can one request body stall the event loop? The worst legal bodies, measured.

    .venv/bin/python bench/bench_loop_stall.py [--root DIR] [--only NAME,...] [--record]

Starts a Pensieve server in a child process (``--root``: the checkout whose
pensieve.py it runs, default this one, so a copy of an older commit gives the
"before"), on a scripted engine that answers at once (the stall measured is
the server's own parsing, not the model's), then sends bodies of several
shapes, each just under the 32 MiB limit, to /v1/messages/count_tokens and
/v1/messages, and chunked bodies sent one byte a chunk. Meanwhile a second
connection asks /health every 10 ms; the table shows the longest wait for a
/health answer while the big request was in flight (the loop's worst stall),
the big request's status and time, the server process's CPU time for it (its
parse worker not included), and its resident memory after.
"""

import argparse
import http.client
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, KEY, free_port, proc_memory, publish, wait_ready  # noqa: E402

TARGET = 32 * 1024 * 1024 - 64 * 1024  # just under MAX_BODY_BYTES
HEAD = b'{"model":"bench","max_tokens":1,'
ONE = b'"messages":[{"role":"user","content":"x"}]'


def _filled(prefix, unit, suffix, target=TARGET):
    n = (target - len(prefix) - len(suffix)) // len(unit)
    return prefix + unit * n + suffix


def shapes():
    """(name, body) of the worst bodies found for json.loads and translation."""
    pad = HEAD + ONE + b',"pad":'
    keys = []
    size, i = len(pad) + 2, 0
    while size < TARGET - 32:
        key = b'"k%d":0' % i
        keys.append(key)
        size += len(key) + 1
        i += 1
    return [
        ("empty lists `[],`", _filled(pad + b"[", b"[],", b"[]]}")),
        ("nested `[[[]]],`", _filled(pad + b"[", b"[[[]]],", b"[[[]]]]}")),
        (f"object keys ({i // 10**6}M)", pad + b"{" + b",".join(keys) + b"}}"),
        ("numbers `0,`", _filled(pad + b"[", b"0,", b"0]}")),
        ("one-word user messages", _filled(HEAD + b'"messages":[',
                                           b'{"role":"user","content":"x"},',
                                           b'{"role":"user","content":"x"}]}')),
        # The largest bodies still accepted (MAX_JSON_VALUES): translated
        # whole, and the second one's answer is the most work to unpickle.
        ("one-word messages, 1M values", _filled(
            HEAD + b'"messages":[', b'{"role":"user","content":"x"},',
            b'{"role":"user","content":"x"}]}', target=len(HEAD) + 30 * 330_000)),
        ("a tool input of 1M values", HEAD + b'"messages":[{"role":"user","content":"x"},'
         b'{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"n",'
         b'"input":{"pad":[' + b"{}," * 999_900 + b'{}]}}]},{"role":"user","content":'
         b'[{"type":"tool_result","tool_use_id":"t","content":"x"}]}]}'),
        ("one long string", _filled(HEAD + b'"messages":[{"role":"user","content":"',
                                    b"abcdefgh", b'"}]}')),
        ("escapes `\\u00e9`", _filled(HEAD + b'"messages":[{"role":"user","content":"',
                                     b"\\u00e9", b'"}]}')),
    ]


def chunked(size):
    """A body of ``size`` bytes of text, as chunks of one byte each."""
    body = _filled(HEAD + b'"messages":[{"role":"user","content":"', b"a", b'"}]}',
                   target=size)
    return b"".join(b"1\r\n%c\r\n" % c for c in body) + b"0\r\n\r\n"


# --- The server, in its own process --------------------------------------------


def serve(port, root):
    """Run the server of checkout ``root`` on a scripted engine (the child)."""
    sys.path.insert(0, str(root))
    import asyncio

    from engine import (Accepted, Counted, CountRequest, Finished, ModelInfo, Stats,
                        TextDelta)
    from pensieve import Config, Server

    class AtOnce:
        """An engine that answers every request at once and keeps none of
        them (tests/helpers.py's ScriptedEngine records its jobs, which would
        count in the server's memory)."""

        model = ModelInfo("bench", 1000, "cpu", "none")

        def start(self, on_loaded=None):
            on_loaded(self.model, None)

        def stop(self, timeout=None):
            pass

        def stats(self):
            return Stats()

        def submit(self, request, deliver):
            if isinstance(request, CountRequest):
                deliver(Counted(1))
            else:
                for msg in (Accepted(1, 1), TextDelta("ok"),
                            Finished("end_turn", None, 1, 1, 0.0, 0.0)):
                    deliver(msg)
            return self

        def cancel(self):
            pass

    asyncio.run(Server(Config(port=port, api_key=KEY), engine=AtOnce()).serve())


def start(root):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="loop_stall_", suffix=".log",
                                      delete=False)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--root",
                             str(root)], stdout=log, stderr=subprocess.STDOUT)
    wait_ready(proc, port, "/health", log)
    return proc, port, log


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- Measuring ------------------------------------------------------------------


class Poller(threading.Thread):
    """Asks /health every 10 ms on one keep-alive connection; records when
    each answer came."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.stop, self.times = port, threading.Event(), []

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        while not self.stop.is_set():
            conn.request("GET", "/health")
            conn.getresponse().read()
            self.times.append(time.perf_counter())
            time.sleep(0.01)
        conn.close()

    def worst_gap(self, start, end):
        marks = [start] + [t for t in self.times if start < t < end] + [end]
        return max(b - a for a, b in zip(marks, marks[1:]))


def _send_all(sock, data):
    try:
        sock.sendall(data)
    except OSError:  # refused part-way: the answer says why
        pass


def send(port, path, payload, chunked_wire=False):
    """(status, seconds) of one POST of ``payload`` (raw chunked wire, or a body)."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"x-api-key: {KEY}",
            "content-type: application/json"]
    head.append("transfer-encoding: chunked" if chunked_wire
                else f"content-length: {len(payload)}")
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        start = time.perf_counter()
        # Sent beside the reading: a body refused part-way is answered
        # (and the connection closed) before it is all sent.
        threading.Thread(target=_send_all, daemon=True, args=(
            sock, ("\r\n".join(head) + "\r\n\r\n").encode() + payload)).start()
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        # The status line is enough: every answer here is short.
        return int(answer.split()[1]) if answer else "closed", time.perf_counter() - start


def measure(proc, port, poller, name, path, payload, chunked_wire=False):
    time.sleep(0.3)  # the poller's steady state
    cpu = cpu_seconds(proc.pid)
    start = time.perf_counter()
    status, seconds = send(port, path, payload, chunked_wire)
    end = time.perf_counter()
    time.sleep(0.05)
    row = (name, path.rsplit("/", 1)[-1], f"{len(payload) / 2**20:.1f}", status,
           f"{seconds:.2f}", f"{poller.worst_gap(start, end) * 1000:.0f}",
           f"{cpu_seconds(proc.pid) - cpu:.2f}",
           f"{proc_memory(proc.pid, 'VmRSS') / 2**20:.0f}")
    print(row, flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--only", default="", help="comma-separated shape names (prefixes)")
    parser.add_argument("--label", default="", help="named in the recorded title")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.root.resolve())
    wanted = [w for w in args.only.split(",") if w]
    proc, port, log = start(args.root.resolve())
    poller = Poller(port)
    poller.start()
    rows = []
    try:
        for name, payload in shapes():
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            for path in ("/v1/messages/count_tokens", "/v1/messages"):
                rows.append(measure(proc, port, poller, name, path, payload))
        for size in (1, 4):
            name = f"{size} MiB in 1-byte chunks"
            if not wanted or any(name.startswith(w) for w in wanted):
                rows.append(measure(proc, port, poller, name, "/v1/messages/count_tokens",
                                    chunked(size * 2**20), chunked_wire=True))
    finally:
        poller.stop.set()
        proc.terminate()
        proc.wait(30)
        log.close()
    publish(table(rows, args), args.record)


def table(rows, args):
    command = "bench/bench_loop_stall.py" + (f" --root {args.root}" if args.root != ROOT
                                             else "")
    lines = [f"## Event-loop stall under the worst request bodies{args.label} "
             f"({date.today()})", "",
             f"`{command}` on {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}: the worst /health wait while the body was "
             "in flight.",
             "",
             "| body | route | MiB (wire) | status | request s | worst /health wait ms "
             "| server CPU s | server RSS after MiB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
