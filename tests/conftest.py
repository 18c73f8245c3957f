"""Shared fixtures: the real embedded model, a tiny random model, scripted engines.

Three tiers (see each test module's header): pure functions; the HTTP
connection loop over real loopback sockets with a scripted engine for timing
and fault cases; the real SmolLM2 end to end through a real server process.
"""

import asyncio
import dataclasses
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

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import (Accepted, Failed, Finished, GenerationRequest, TextDelta,  # noqa: E402
                    ToolCallEnd, ToolCallStart, ToolInputDelta)
from engine.models import use_openblas  # noqa: E402

# Before any fixture imports MLX, as the server does before loading: engines
# made in this process then run on OpenBLAS too (a ~1k-token SmolLM2 prompt:
# 95 s on the bundled reference BLAS, 6 s on OpenBLAS).
use_openblas()
from pensieve import Config, Server  # noqa: E402

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


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A fresh model cache for the session, so the first-run import is exercised."""
    return tmp_path_factory.mktemp("pensieve-cache")


@pytest.fixture(scope="session")
def smollm_dir(cache_dir):
    """The embedded SmolLM2-135M-Instruct, imported from its GGUF into MLX."""
    from engine.models import embedded_gguf, imported_dir

    return imported_dir(embedded_gguf(), cache_dir)


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


@pytest.fixture(scope="session")
def tiny_model_dir(smollm_dir, tmp_path_factory):
    """A 2-layer random-weight llama with SmolLM2's real tokenizer and template.

    Fast enough for engine tests; its text is gibberish but deterministic
    under greedy sampling. Context window 256 so overflow is cheap to reach.
    """
    import shutil

    out = tmp_path_factory.mktemp("tiny-model")
    write_tiny_llama(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_dir / name, out / name)
    return out


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


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    """The real engine on the tiny random model, in-process."""
    srv = ServerThread(Config(host="127.0.0.1", port=0, model=str(tiny_model_dir),
                              cpu_weights="stored")).start()
    yield srv
    srv.stop()


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


@pytest.fixture(scope="session")
def real_server(cache_dir, smollm_dir):
    """``python pensieve.py`` on the embedded SmolLM2, as a user starts it, at
    its trained window: the API tests know its greedy answers there (past it,
    served by default at 32k, RoPE is scaled; tests/test_claude_code.py)."""
    server = PensieveProcess(cache_dir, "--context-window", "8192")
    yield server.url
    server.stop()


# --- The real engine with scripted tool calls --------------------------------


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
        offered = {t["name"] for t in request.offered}
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


# --- A scripted engine for timing and fault cases ------------------------------


@dataclass(frozen=True)
class FakeModel:
    name: str = "scripted"
    context_window: int = 1000
    device: str = "cpu"
    weights: str = "none"


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

    def start(self):
        pass

    def wait_loaded(self, timeout=None):
        return self.model

    def stop(self, timeout=None):
        pass

    def stats(self):
        return {"running": self.running, "waiting": self.waiting}

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


@pytest.fixture
def scripted():
    """Start a server on a ScriptedEngine: ``srv = scripted(script)``."""
    servers = []

    def start(script=None, model=FakeModel(), **config):
        engine = ScriptedEngine(script, model)
        srv = ServerThread(Config(host="127.0.0.1", port=0, **config),
                           engine=engine).start()
        srv.engine = engine
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


__all__ = ["API_KEY", "Accepted", "Failed", "Finished", "TextDelta"]
