"""Shared fixtures: the real embedded model, a tiny random model, scripted engines.

Three tiers (see each test module's header): pure functions; the HTTP
connection loop over real loopback sockets with a scripted engine for timing
and fault cases; the real SmolLM2 end to end through a real server process.
The classes and functions these fixtures are built on, which the test
modules import too, are in helpers.py.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.models import use_openblas  # noqa: E402

# Before any fixture imports MLX, as the server does before loading: engines
# made in this process then run on OpenBLAS too (a ~1k-token SmolLM2 prompt:
# 95 s on the bundled reference BLAS, 6 s on OpenBLAS).
use_openblas()
from helpers import (FakeModel, PensieveProcess, ScriptedEngine, ServerThread,  # noqa: E402
                     write_tiny_llama)
from pensieve import Config  # noqa: E402


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


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    """The real engine on the tiny random model, without a server; one per
    module, so a module's tests may leave it in any state they like."""
    from engine import Engine

    eng = Engine(str(tiny_model_dir), cpu_weights="stored")
    eng.start()
    eng.wait_loaded(120)
    yield eng
    eng.stop(10)


# --- Servers ------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    """The real engine on the tiny random model, in-process."""
    srv = ServerThread(Config(host="127.0.0.1", port=0, model=str(tiny_model_dir),
                              cpu_weights="stored")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def real_server(cache_dir, smollm_dir):
    """``python pensieve.py`` on the embedded SmolLM2, as a user starts it, at
    its trained window: the API tests know its greedy answers there (past it,
    served by default at 32k, RoPE is scaled; tests/test_claude_code.py)."""
    server = PensieveProcess(cache_dir, "--context-window", "8192")
    yield server.url
    server.stop()


# --- A scripted engine for timing and fault cases ------------------------------


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


# --- Markers (pyproject.toml): `make test-fast` leaves these tests out ---------

# Every fixture that loads a model is built on one of MODEL_FIXTURES
# (tiny_server, real_server and the modules' own: engines, serve, stepped,
# roomy_model_dir, ...). real_server is the shared fixture that starts
# `python pensieve.py`; the modules' own such fixtures are in modules marked
# ``process`` as a whole (tests/test_claude_code.py).
MODEL_FIXTURES = {"smollm_dir", "tiny_model_dir"}
PROCESS_FIXTURES = {"real_server"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """Mark ``model`` every test that uses a model fixture and ``process``
    every test that uses a process fixture, directly or through other
    fixtures. A test that builds an engine, or spawns a process, in its own
    body carries the mark itself."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)
        if used & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.process)
