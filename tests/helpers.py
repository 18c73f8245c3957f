"""What the test modules and benches share: servers, engines, clients, constants.

Plain classes, functions and constants, no fixtures (those are in
conftest.py, built on these). Imported as ``from helpers import ...`` by
tests/test_*.py and by the benches that run the test suite's servers
(bench/bench_auto_mode.py, bench/bench_claude_code.py). Imports no MLX:
write_tiny_llama loads it when called, and the engine loads it when started,
so conftest.py (and a bench) can turn on OpenBLAS first.
"""

import asyncio
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from engine import (Accepted, Engine, Failed, Finished, GenerationRequest, ModelInfo,
                    Stats, TextDelta, ToolCallEnd, ToolCallStart, ToolInputDelta)
from engine.slot import Slot
from pensieve import Server

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "pensieve-local-token"


def claude_cli():
    """The Claude Code CLI the tests drive: $PENSIEVE_CLAUDE_CLI (make
    test-claude-latest sets it), else the pinned one make test installs, else
    one on PATH; None if there is none."""
    import shutil

    return os.environ.get("PENSIEVE_CLAUDE_CLI") or shutil.which(
        "claude", path=str(ROOT / ".claude-cli" / "node_modules" / ".bin")) \
        or shutil.which("claude")


# --- Models -------------------------------------------------------------------


def write_tiny_llama(out, vocab_size=49152, window=256):
    """Random weights of a 2-layer llama in ``out`` (config.json, weights)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    config = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": vocab_size, "rope_theta": 10000.0,
        "max_position_embeddings": window, "tie_word_embeddings": True,
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))


# --- Servers ------------------------------------------------------------------


class ServerThread:
    """A Server running on its own event loop in a background thread."""

    def __init__(self, config, engine=None):
        self.server = Server(config, engine=engine)
        self._ready = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        async def main():
            waiter = asyncio.create_task(self.server.started.wait())
            waiter.add_done_callback(lambda _: self._ready.set())
            await self.server.serve()

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by start()
            self.error = e
        finally:
            self._ready.set()

    def start(self, timeout=120):
        self.thread.start()
        self._ready.wait(timeout)
        if self.error is not None:
            raise self.error
        return self

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def port(self):
        return self.server.port

    def stop(self):
        self.server.stop()
        self.thread.join(30)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if json.load(r)["status"] == "healthy":
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("server did not become healthy")


class PensieveProcess:
    """``python pensieve.py ARGS`` on a free port, its output in a log file."""

    def __init__(self, cache_dir, *args, name="server"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cache_dir / f"{name}.log"
        env = {**os.environ, "PENSIEVE_CACHE_DIR": str(cache_dir),
               "PENSIEVE_PORT": str(self.port), "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "pensieve.py"), *args],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        try:
            wait_healthy(self.url, self.proc)
        except BaseException:
            self.stop()
            raise

    def log(self):
        return self.log_path.read_text()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


# --- The real engine with scripted tool calls ---------------------------------


class ScriptedCalls:
    """The real engine, except that a request offering the tool of the next
    scripted call is answered with that call: the embedded 135M model never
    decides to call a tool by itself. Such a request is still read by the
    real engine (to its first token), so its prompt lands in the prompt cache
    as a real turn's would; if that read fails (a prompt too long), the call
    waits for the next request. A call may carry a third item, a test of the
    request (say, its last user text), so side requests do not take it.
    Records every GenerationRequest with what was delivered for it, and the
    engine's own Finished."""

    def __init__(self, real):
        self.real = real
        # (name, input[, when(request)]) to answer, in order; a name of None
        # answers with the text ``input`` instead (a summary on demand).
        self.calls = []
        self.seen = []  # (GenerationRequest, [messages delivered], engine Finished)

    def __getattr__(self, name):  # start, wait_loaded, stop, stats, model, ...
        return getattr(self.real, name)

    def submit(self, request, deliver):
        if not isinstance(request, GenerationRequest):
            return self.real.submit(request, deliver)  # token counts
        sent = []
        entry = [request, sent, None]
        self.seen.append(entry)
        offered = {t.name for t in request.offered}
        call = self.calls[0] if self.calls else None
        if not (call and (call[0] is None or call[0] in offered)
                and (len(call) < 3 or call[2](request))):
            def record(msg):
                sent.append(msg)
                if isinstance(msg, Finished):
                    entry[2] = msg
                deliver(msg)

            return self.real.submit(request, record)
        self.calls.pop(0)
        name, arguments = call[:2]
        script = [TextDelta(arguments)] if name is None else [
            ToolCallStart(name), ToolInputDelta(json.dumps(arguments)),
            ToolCallEnd(arguments)]

        def read_then_call(msg):
            if isinstance(msg, Accepted):
                out = [msg]
            elif isinstance(msg, Finished):
                entry[2] = msg
                out = script + [dataclasses.replace(
                    msg, stop_reason="end_turn" if name is None else "tool_use",
                    output_tokens=len(script))]
            elif isinstance(msg, Failed):
                self.calls.insert(0, call)
                out = [msg]
            else:
                return  # the model's own first token: replaced by the call
            for m in out:
                sent.append(m)
                deliver(m)

        return self.real.submit(dataclasses.replace(request, max_tokens=1), read_then_call)


# --- A scripted engine for timing and fault cases -----------------------------


def FakeModel(name="scripted", context_window=1000, device="cpu", weights="none"):
    """The ModelInfo a scripted engine says it serves."""
    return ModelInfo(name, context_window, device, weights)


class FakeJob:
    def __init__(self, request):
        self.request = request
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


class ScriptedEngine:
    """Engine stand-in whose output is a script: a list of messages and delays.

    ``script(request)`` returns items: engine messages to deliver, or numbers
    (seconds to sleep). Each job runs on its own thread; ``jobs`` records them.
    ``model``: the FakeModel it says it serves.
    """

    def __init__(self, script=None, model=FakeModel()):
        self.script = script or (lambda request: [
            Accepted(3, request.max_tokens), TextDelta("Hello"), TextDelta(" world"),
            Finished("end_turn", None, 3, 2, 0.0, 0.0)])
        self.model = model
        self.jobs = []
        self.running = self.waiting = 0

    def start(self, on_loaded=None):
        if on_loaded is not None:
            on_loaded(self.model, None)  # loaded at once

    def wait_loaded(self, timeout=None):
        return self.model

    def stop(self, timeout=None):
        pass

    def stats(self):
        return Stats(running=self.running, waiting=self.waiting)

    def submit(self, request, deliver):
        job = FakeJob(request)
        self.jobs.append(job)

        def run():
            for item in self.script(request):
                if job.cancelled.is_set():
                    return
                if isinstance(item, (int, float)):
                    job.cancelled.wait(item)
                else:
                    deliver(item)

        threading.Thread(target=run, daemon=True).start()
        return job


# --- The real engine, a step at a time ----------------------------------------


class SteppedEngine(Engine):
    """Runs a step of work (solo or batch) only when the test calls ``step()``."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._allowed = threading.Semaphore(0)

    def step(self, n=1):
        for _ in range(n):
            self._allowed.release()

    def _advance(self):
        if not self._runners.running:
            return  # nothing to run: the engine goes back to its inbox
        while not self._allowed.acquire(timeout=0.1):
            if self._stopping:
                return
        super()._advance()


# --- HTTP requests and clients -------------------------------------------------


# A stuck server fails the test instead of hanging the suite.
HANG_GUARD_S = 5
MODEL = "claude-test"
FINISHED = Finished("end_turn", None, 3, 2, 0.0, 0.0)
DROP = object()  # marks a field to leave out of a request body


def body(text="hi", **changes):
    """A valid Messages request body, with fields changed (or DROPped)."""
    out = {"model": MODEL, "max_tokens": 16,
           "messages": [{"role": "user", "content": text}], **changes}
    return {k: v for k, v in out.items() if v is not DROP}


def raw_request(method="POST", path="/v1/messages", payload=None, *, key=API_KEY,
                headers=()):
    """The bytes of one HTTP/1.1 request; ``payload`` is a dict or bytes."""
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if key is not None:
        lines.append(f"x-api-key: {key}")
    if payload is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (payload or b"")


@dataclass
class Reply:
    status: int
    headers: dict  # lower-case names
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)


class RawConnection:
    """A loopback socket that sends raw bytes and parses whole responses."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
        self.buffer = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def send(self, data, bytewise=False):
        for piece in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
            self.sock.sendall(piece)
            time.sleep(0)

    def read_until(self, marker):
        """Everything up to and including ``marker``; EOFError if the server closes."""
        while marker not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed before {marker!r}")
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def read_exactly(self, size):
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed with {len(self.buffer)} of {size} bytes")
            self.buffer += data
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def read_response(self, method="POST"):
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")[:-2]
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if method == "HEAD":
            content = b""
        elif headers.get("transfer-encoding") == "chunked":
            content = b""
            while size := int(self.read_until(b"\r\n")[:-2], 16):
                content += self.read_exactly(size)
                assert self.read_exactly(2) == b"\r\n"
            assert self.read_exactly(2) == b"\r\n"  # the terminator; no trailers
        else:
            content = self.read_exactly(int(headers.get("content-length", 0)))
        return Reply(status, headers, content)

    def outcome(self):
        """The next response's status, or "closed" if the server hung up instead."""
        try:
            return self.read_response().status
        except (EOFError, ConnectionResetError):
            return "closed"


def call(srv, method, path, payload=None, *, key=API_KEY, headers=None):
    """One request through http.client on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=HANG_GUARD_S)
    sent = {"x-api-key": key} if key is not None else {}
    sent.update(headers or {})
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    if payload is not None:
        sent["content-type"] = "application/json"
    try:
        conn.request(method, path, body=payload, headers=sent)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                     resp.read())
    finally:
        conn.close()


def sse_events(content):
    """[(event name, data dict), ...] from an SSE body."""
    events = []
    for block in content.decode().split("\n\n"):
        if block:
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def assert_error(reply, status, error_type):
    """Check Anthropic's error shape; return the error message."""
    assert reply.status == status, reply.body
    data = reply.json
    assert data["type"] == "error"
    assert data["error"]["type"] == error_type
    assert data["request_id"] == reply.headers["request-id"]
    return data["error"]["message"]


def wait_until(predicate, timeout=HANG_GUARD_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the hang guard"
        time.sleep(0.01)


# --- Engines that fail or never load ----------------------------------------


class FaultySlot(Slot):
    """Fails at its third token if its last message says FAULT."""

    def deliver_token(self, token):
        last = self.job.request.messages[-1]
        text = last[1] if isinstance(last, tuple) else last.text
        if "FAULT" in text and self.output_tokens == 2:
            raise RuntimeError("injected fault")
        return super().deliver_token(token)


class FaultyEngine(Engine):
    """Fails requests whose prompt says FAULT at their third token, and every
    request in the batch at the next step once ``break_batch`` is set."""

    break_batch = False
    slot_type = FaultySlot

    def _advance(self):
        if self.break_batch and len(self._runners.batch):
            self.break_batch = False
            generator = self._runners.batch._generator
            real_next = generator.next

            def broken():
                generator.next = real_next
                raise RuntimeError("injected batch fault")

            generator.next = broken
        super()._advance()


class SlowLoad:
    """An engine whose model takes until ``finish`` to load, stop or not."""

    def __init__(self):
        self.finish = threading.Event()
        self.stopped = threading.Event()

    def start(self, on_loaded=None):
        def load():
            self.finish.wait()
            if on_loaded is not None:
                on_loaded(None, RuntimeError("never loaded"))

        threading.Thread(target=load, daemon=True).start()

    def wait_loaded(self, timeout=None):
        self.finish.wait()
        raise RuntimeError("never loaded")

    def submit(self, request, deliver):
        raise AssertionError("nothing is submitted before the model loads")

    def stats(self):
        return Stats()

    def stop(self, timeout=None):
        self.stopped.set()
