"""Hostile and unlucky clients, over real loopback sockets: one test per case.

Limits and timeouts (trickled heads, stalled and endless bodies, idle
keep-alive, the connection cap, clients that stop reading), request
smuggling, parameter bounds, the bind/Host/Origin/content-type defences,
errors that hide internals, disconnects the engine must notice (the real
engine on the tiny model), and graceful shutdown (in-process, and the real
process under SIGTERM/SIGINT). Timeouts are shortened with monkeypatch; no
test asserts timing beyond "before the hang guard".

    .venv/bin/python -m pytest -q tests/test_hardening.py
"""

import asyncio
import hmac
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import (API_KEY, FINISHED, HANG_GUARD_S, ROOT, RawConnection, ServerThread,
                     SlowLoad, SteppedEngine, assert_error, body, call, free_port,
                     raw_request, sse_events, wait_healthy, wait_until, write_tiny_llama)

import pensieve
from engine import Accepted, TextDelta
from pensieve import Config, ConfigError, Server, check_config, is_loopback


@pytest.fixture(autouse=True)
def quick_drain(monkeypatch):
    """An answer given before its request was read waits DRAIN_TIMEOUT_S for
    the client to go; the clients here wait for the close instead."""
    monkeypatch.setattr(pensieve, "DRAIN_TIMEOUT_S", 0.5)


def endless(request):
    """A script that streams until its job is cancelled."""
    yield Accepted(3, request.max_tokens)
    while True:
        yield TextDelta("x" * 64)
        yield 0.002


def flood(request):
    """A script that streams 64 KiB deltas until its job is cancelled."""
    yield Accepted(3, request.max_tokens)
    while True:
        yield TextDelta("x" * 65536)
        yield 0.001


def rest_of_stream(conn):
    """[(event name, data), ...] of a stream whose head was already read,
    up to its last chunk."""
    raw = conn.read_until(b"\r\n0\r\n\r\n").decode()
    return [(name, json.loads(data))
            for name, data in re.findall(r"event: (\w+)\ndata: ([^\n]*)\n\n", raw)]


def closed(sock, timeout=HANG_GUARD_S):
    """Whether the server closes ``sock`` (reading and dropping what it sends)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def trickle(sock, pieces, every):
    """Send ``pieces`` one by one, ``every`` seconds apart, until the server
    closes; returns how many went out (all of them: it never closed)."""
    sock.settimeout(every)
    for sent, piece in enumerate(pieces):
        try:
            sock.sendall(piece)
            if sock.recv(65536) == b"":
                return sent
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent
    return len(pieces)


@pytest.fixture
def srv(scripted):
    return scripted()


# --- Limits and timeouts ---------------------------------------------------------


def test_a_trickled_head_is_cut_off_at_its_deadline(srv, monkeypatch):
    """Slowloris: a byte now and then resets no clock; the head's deadline holds."""
    monkeypatch.setattr(pensieve, "HEAD_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent = trickle(sock, [b"X-Slow: a\r\n"] * 200, every=0.05)
    assert sent < 200  # 200 x 0.05 s = 10 s of trickling, far past the deadline
    assert call(srv, "GET", "/health").status == 200


def test_a_body_sent_too_slowly_is_408_and_close(srv, monkeypatch):
    monkeypatch.setattr(pensieve, "BODY_TIMEOUT_S", 0.5)
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(headers=["Content-Type: application/json",
                                       "Content-Length: 1000"]))
        conn.sock.settimeout(0.05)
        reply = None
        for _ in range(200):  # one byte every 0.05 s: never a stall, never done
            conn.sock.sendall(b" ")
            try:
                reply = conn.read_response()
                break
            except socket.timeout:
                continue
        assert reply is not None
        conn.sock.settimeout(HANG_GUARD_S)
        assert conn.outcome() == "closed"
    assert_error(reply, 408, "invalid_request_error")
    assert srv.engine.jobs == []


def test_an_idle_keep_alive_connection_is_closed(srv, monkeypatch):
    monkeypatch.setattr(pensieve, "KEEPALIVE_TIMEOUT_S", 0.3)
    with RawConnection(srv.port) as conn:
        conn.send(raw_request("GET", "/health"))
        assert conn.read_response().status == 200
        assert closed(conn.sock)


def test_keep_alive_outlasts_the_sdks_connection_pool():
    # A server that closed a pooled connection first would race the client's
    # next request on it.
    from anthropic._constants import DEFAULT_CONNECTION_LIMITS

    assert pensieve.KEEPALIVE_TIMEOUT_S > DEFAULT_CONNECTION_LIMITS.keepalive_expiry


def test_a_chunked_body_over_the_limit_is_413_and_close(srv, monkeypatch):
    monkeypatch.setattr(pensieve, "MAX_BODY_BYTES", 1000)
    chunk = b"400\r\n" + b" " * 0x400 + b"\r\n"
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(headers=["Content-Type: application/json",
                                       "Transfer-Encoding: chunked"]))
        try:
            for _ in range(8):
                conn.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = conn.read_response()
        assert conn.outcome() == "closed"
    assert_error(reply, 413, "request_too_large")
    assert srv.engine.jobs == []


def test_at_the_connection_cap_the_longest_idle_connection_makes_room(scripted):
    srv = scripted(max_connections=3)
    idle = [RawConnection(srv.port) for _ in range(3)]
    for conn in idle:  # each served once, now an idle keep-alive connection
        conn.send(raw_request("GET", "/health"))
        assert conn.read_response().status == 200
    assert call(srv, "GET", "/health").status == 200  # a fourth client
    assert closed(idle[0].sock)  # the longest idle went
    for conn in idle[1:]:  # the others still work
        conn.send(raw_request("GET", "/health"))
        assert conn.read_response().status == 200
    for conn in idle:
        conn.sock.close()


def test_at_the_connection_cap_with_nothing_idle_new_clients_get_503(scripted):
    srv = scripted(max_connections=2)
    stalled = [RawConnection(srv.port) for _ in range(2)]
    for conn in stalled:  # a whole head, its body still due: busy, not idle
        conn.send(raw_request(payload=b"{}")[:-2])
    wait_until(lambda: len(srv.server._connections) == 2 and all(
        http.head_since is None for http in srv.server._connections.values()))
    reply = call(srv, "GET", "/health")
    assert_error(reply, 503, "overloaded_error")
    assert reply.headers["connection"] == "close"
    assert "retry-after" in reply.headers
    for conn in stalled:
        conn.sock.close()
    wait_until(lambda: call(srv, "GET", "/health").status == 200)


def test_a_client_that_stops_reading_loses_its_request(scripted, monkeypatch):
    monkeypatch.setattr(pensieve, "WRITE_TIMEOUT_S", 0.5)
    srv = scripted(flood)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", srv.port))
    sock.sendall(raw_request(payload=body(stream=True)))
    # Never read: the socket buffers fill, the write stalls, the job goes.
    wait_until(lambda: srv.engine.jobs and srv.engine.jobs[0].cancelled.is_set(),
               timeout=15)
    sock.close()
    assert call(srv, "GET", "/health").status == 200


def test_bytes_sent_during_an_answer_are_not_buffered_without_bound(scripted):
    srv = scripted(endless)
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body(stream=True)))
        conn.read_until(b"content_block_delta")
        conn.sock.settimeout(2)
        sent = 0
        try:  # the server reads ahead to notice a hang-up, but only so far
            while sent < 1 << 30:
                sent += conn.sock.send(b"x" * 65536)
        except socket.timeout:
            pass
    assert sent < 1 << 30
    assert call(srv, "GET", "/health").status == 200


# --- Request smuggling ------------------------------------------------------------


@pytest.mark.parametrize("headers, status", [
    pytest.param(["Content-Length: 4", "Transfer-Encoding: chunked"], 400, id="cl-and-te"),
    pytest.param(["Transfer-Encoding: chunked", "Content-Length: 4"], 400, id="te-and-cl"),
    pytest.param(["Content-Length: 4", "Content-Length: 5"], 400, id="two-lengths"),
    pytest.param(["Content-Length: 4x"], 400, id="bad-length"),
    pytest.param(["Transfer-Encoding: gzip"], 501, id="gzip"),
    pytest.param(["Transfer-Encoding: gzip, chunked"], 501, id="gzip-chunked"),
    pytest.param(["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], 501,
                 id="te-twice"),
    pytest.param([" Content-Length: 4"], 403, id="folded-into-host"),
])
def test_ambiguous_framing_is_refused_and_the_connection_closed(srv, headers, status):
    # Whatever follows the head ("GET /v1/models" here) must never be read as
    # a second request: the answer is an error, then the connection closes.
    smuggled = raw_request("GET", "/v1/models")
    # key=None puts the listed headers right after Host: a line starting with
    # a space continues the Host header (obsolete line folding).
    request = raw_request("POST", "/health", key=None, headers=headers)
    with RawConnection(srv.port) as conn:
        conn.send(request + b"0\r\n\r\n" + smuggled)
        reply = conn.read_response()
        assert conn.outcome() == "closed"
    assert reply.status == status
    assert reply.json["type"] == "error"
    assert srv.engine.jobs == []


def test_a_bad_chunk_size_is_400_and_close(srv):
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(headers=["Content-Type: application/json",
                                       "Transfer-Encoding: chunked"]) + b"-5\r\nhello\r\n")
        reply = conn.read_response()
        assert conn.outcome() == "closed"
    assert_error(reply, 400, "invalid_request_error")


# --- Parameter bounds ---------------------------------------------------------------


def nested(depth):
    value = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("payload, field", [
    pytest.param(body(max_tokens=-1), "max_tokens", id="max-tokens-negative"),
    pytest.param(body(max_tokens=10**12), "max_tokens", id="max-tokens-absurd"),
    pytest.param(body(top_k=-1), "top_k", id="top-k-negative"),
    pytest.param(body(top_k=10**12), "top_k", id="top-k-absurd"),
    pytest.param(body(temperature=5), "temperature", id="temperature-high"),
    pytest.param(body(temperature=-0.5), "temperature", id="temperature-negative"),
    pytest.param(body(top_p=2), "top_p", id="top-p-high"),
    pytest.param(body(stop_sequences=["s"] * 1000), "stop_sequences", id="many-stops"),
    pytest.param(body(stop_sequences=["s" * 100_000]), "stop_sequences", id="long-stop"),
    pytest.param(body(metadata=nested(500)), "metadata.a.a", id="deep-json"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested deeper", id="very-deep-json"),
    pytest.param(json.dumps(body(temperature=0)).replace('"temperature": 0',
                                                         '"temperature": NaN').encode(),
                 "NaN", id="nan"),
    pytest.param(json.dumps(body(text="caf\u00e9"), ensure_ascii=False).encode("latin-1"),
                 "UTF-8",
                 id="latin-1"),
    pytest.param(json.dumps(body()).encode("utf-16"), "UTF-8", id="utf-16"),
    pytest.param(json.dumps(body(text="\ud800 lone")).encode(), "messages.0.content",
                 id="lone-surrogate"),
    # Found by tests/test_fuzz.py: a list where a block type belongs was a 500.
    pytest.param(body(text=[{"type": "tool_result", "tool_use_id": "t",
                             "content": [{"type": []}]}]),
                 "messages.0.content.0.content.0", id="list-as-block-type"),
])
def test_out_of_bounds_requests_are_400_naming_the_field(srv, payload, field):
    message = assert_error(call(srv, "POST", "/v1/messages", payload), 400,
                           "invalid_request_error")
    assert field in message
    assert srv.engine.jobs == []


def test_requests_at_the_bounds_are_served(srv):
    payload = body(max_tokens=pensieve.MAX_TOKENS_LIMIT, top_k=pensieve.MAX_TOP_K,
                   stop_sequences=["s" * pensieve.MAX_STOP_SEQUENCE_CHARS]
                   * pensieve.MAX_STOP_SEQUENCES,
                   metadata=nested(pensieve.MAX_JSON_DEPTH - 1))
    assert call(srv, "POST", "/v1/messages", payload).status == 200


def test_an_error_answer_to_head_has_no_body_and_the_connection_goes_on(srv):
    # Found by tests/test_fuzz.py: a JSON body on a HEAD error broke the loop.
    with RawConnection(srv.port) as conn:
        conn.send(raw_request("HEAD", "/nowhere"))
        reply = conn.read_response("HEAD")
        assert reply.status == 404 and reply.body == b""
        conn.send(raw_request("HEAD", "/v1/messages"))
        assert conn.read_response("HEAD").status == 405
        conn.send(raw_request("GET", "/health"))
        assert conn.read_response().status == 200


def test_garbage_after_a_head_request_gets_a_whole_answer(srv, caplog):
    # Found by tests/test_fuzz.py: the answer to the garbage was framed as a
    # reply to the HEAD before it (a length, no body), and the loop broke.
    with caplog.at_level(logging.ERROR, logger="pensieve.http"):
        with RawConnection(srv.port) as conn:
            conn.send(raw_request("HEAD", "/v1/messages") + b"{garbage")
            assert conn.read_response("HEAD").status == 405
            conn.sock.shutdown(socket.SHUT_WR)
            reply = conn.read_response()
    assert_error(reply, 400, "invalid_request_error")
    assert reply.headers["request-id"] in reply.json["request_id"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- Security: bind address, keys, Host, Origin, content type ----------------------


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LocalHost.", True), ("app.localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.20", False),
    ("example.com", False), ("localhost.example.com", False), ("127.0.0.1.nip.io", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_non_loopback_bind_needs_a_key_of_its_own():
    with pytest.raises(ConfigError, match="default API key"):
        check_config(Config(host="0.0.0.0"))
    with pytest.raises(ConfigError, match="default API key"):
        asyncio.run(Server(Config(host="0.0.0.0", port=0)).serve())
    check_config(Config(host="0.0.0.0", api_key="a-secret-of-my-own"))
    check_config(Config(host="localhost"))


@pytest.mark.process
def test_the_cli_refuses_a_non_loopback_bind_with_the_default_key():
    out = subprocess.run([sys.executable, str(ROOT / "pensieve.py"), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PENSIEVE_API_KEY": ""})
    assert out.returncode == 2
    assert "default API key" in out.stderr and "--api-key" in out.stderr


def test_keys_are_compared_in_constant_time(srv, monkeypatch):
    compared, compare = [], hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(pensieve.hmac, "compare_digest", spy)
    assert call(srv, "GET", "/v1/models", key="wrong").status == 401
    assert call(srv, "GET", "/v1/models").status == 200
    assert compared == [(b"wrong", API_KEY.encode()), (API_KEY.encode(), API_KEY.encode())]


@pytest.mark.parametrize("target", [
    "http://127.0.0.1/v1/models", "//v1/models", "/health/../v1/models",
    "/v1/models/../../health", "/V1/MODELS", "/v1/%6dodels",
])
def test_no_spelling_of_a_path_skips_the_key(srv, target):
    with RawConnection(srv.port) as conn:
        conn.send(raw_request("GET", target, key=None,
                              headers=["X-Forwarded-Host: 127.0.0.1",
                                       "X-Original-URL: /health"]))
        reply = conn.read_response()
    assert reply.status in (401, 404)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7777", "10.0.0.1",
                                  "127.0.0.1.evil.example", "localhost:x", "[::1"])
def test_a_foreign_host_header_is_403(srv, host):
    with RawConnection(srv.port) as conn:
        conn.send(raw_request("GET", "/health").replace(b"Host: 127.0.0.1",
                                                         f"Host: {host}".encode()))
        reply = conn.read_response()
        assert conn.outcome() == "closed"
    assert_error(reply, 403, "permission_error")


def test_a_request_without_a_host_header_is_403(srv):
    with RawConnection(srv.port) as conn:  # HTTP/1.0 may leave Host out
        conn.send(b"GET /health HTTP/1.0\r\n\r\n")
        assert_error(conn.read_response(), 403, "permission_error")


@pytest.mark.parametrize("host", ["localhost", "localhost:7777", "127.0.0.1:1",
                                  "[::1]:7777", "LOCALHOST."])
def test_loopback_host_headers_are_served(srv, host):
    reply = call(srv, "GET", "/health", headers={"Host": host})
    assert reply.status == 200


def test_allowed_hosts_extend_the_loopback_names(scripted):
    srv = scripted(allowed_hosts=("pensieve.lan",))
    assert call(srv, "GET", "/health", headers={"Host": "pensieve.lan:7777"}).status == 200
    assert call(srv, "GET", "/health", headers={"Host": "other.lan"}).status == 403
    srv = scripted(allowed_hosts=("*",))
    assert call(srv, "GET", "/health", headers={"Host": "other.lan"}).status == 200


def test_hosts_and_origins_from_flags_or_the_environment(monkeypatch):
    monkeypatch.setenv("PENSIEVE_ALLOWED_HOSTS", "a.lan, b.lan")
    monkeypatch.setenv("PENSIEVE_CORS_ORIGINS", "https://app.example")
    config, *_ = pensieve.parse_args([])
    assert config.allowed_hosts == ("a.lan", "b.lan")
    assert config.cors_origins == ("https://app.example",)
    config, *_ = pensieve.parse_args(["--allowed-host", "c.lan", "--shutdown-timeout", "5",
                                     "--max-connections", "9"])
    assert config.allowed_hosts == ("c.lan",)  # a flag wins over the variable
    assert (config.shutdown_timeout, config.max_connections) == (5.0, 9)


def test_no_cors_headers_by_default(srv):
    reply = call(srv, "GET", "/health")
    assert not [h for h in reply.headers if h.startswith("access-control")]


@pytest.mark.parametrize("method, path, payload", [
    ("POST", "/v1/messages", body()), ("GET", "/v1/models", None),
    ("GET", "/health", None), ("OPTIONS", "/v1/messages", None),
])
def test_a_foreign_browser_origin_is_403(srv, method, path, payload):
    reply = call(srv, method, path, payload, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert_error(reply, 403, "permission_error")
    assert not [h for h in reply.headers if h.startswith("access-control")]
    assert srv.engine.jobs == []


def test_an_allowed_origin_gets_cors_and_a_preflight(scripted):
    origin, key = "https://app.example", "a-secret-of-my-own"  # not the public default
    srv = scripted(cors_origins=(origin,), api_key=key)
    pre = call(srv, "OPTIONS", "/v1/messages", key=None, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type, anthropic-version"})
    assert pre.status == 204 and pre.body == b""
    assert pre.headers["access-control-allow-origin"] == origin
    assert pre.headers["access-control-allow-methods"] == "POST"
    assert "x-api-key" in pre.headers["access-control-allow-headers"]
    reply = call(srv, "POST", "/v1/messages", body(), key=key, headers={"Origin": origin})
    assert reply.status == 200
    assert reply.headers["access-control-allow-origin"] == origin
    assert call(srv, "POST", "/v1/messages", body(), key=key,
                headers={"Origin": "https://other.example"}).status == 403


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
    "application/jsonx",
])
def test_a_post_that_is_not_json_is_415(srv, content_type):
    # The kinds a web page can POST cross-site without a preflight.
    payload = json.dumps(body()).encode()
    headers = [f"Content-Length: {len(payload)}"]
    if content_type:
        headers.append(f"Content-Type: {content_type}")
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(headers=headers) + payload)
        reply = conn.read_response()
    assert_error(reply, 415, "invalid_request_error")
    assert srv.engine.jobs == []


def test_json_with_a_charset_is_json(srv):
    reply = call(srv, "POST", "/v1/messages", json.dumps(body()).encode(),
                 headers={"Content-Type": "application/json; charset=utf-8"})
    assert reply.status == 200


def test_a_handler_crash_shows_no_internals(srv, monkeypatch, caplog):
    def broken():
        raise RuntimeError("secret detail at /home/user/model")

    monkeypatch.setattr(srv.server.api, "health_status", broken)
    with caplog.at_level(logging.ERROR, logger="pensieve.http"):
        reply = call(srv, "GET", "/health")
    message = assert_error(reply, 500, "api_error")
    assert "secret" not in reply.body.decode() and "Traceback" not in reply.body.decode()
    assert message == "internal server error"
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and reply.headers["request-id"] in logged[0].getMessage()
    assert "secret detail" in str(logged[0].exc_info[1])


# --- Faults: disconnects the real engine notices ----------------------------------------


@pytest.fixture
def stepped(tiny_model_dir):
    """A server on the real engine, advanced one step at a time by the test."""
    started = []

    def start(**config):
        engine = SteppedEngine(str(tiny_model_dir), cpu_weights="stored", prefill_chunk=16,
                               max_running=config.get("max_running", 4))
        srv = ServerThread(Config(host="127.0.0.1", port=0, model=str(tiny_model_dir),
                                  **config), engine=engine).start()
        srv.engine = engine
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


LONG_PROMPT = " ".join(f"item{i}" for i in range(60))  # ~200 tokens: a dozen steps


def stream_request(text, max_tokens=40):
    return raw_request(payload={"model": "m", "max_tokens": max_tokens, "stream": True,
                                "messages": [{"role": "user", "content": text}]})


def test_a_disconnect_during_prefill_stops_the_prompt(stepped, caplog):
    srv = stepped()
    with caplog.at_level(logging.INFO, logger="pensieve.engine"):
        with RawConnection(srv.port) as conn:
            conn.send(stream_request(LONG_PROMPT))
            wait_until(lambda: srv.engine.stats().running == 1)
            srv.engine.step(2)  # two 16-token slices of ~200
        wait_until(lambda: (srv.engine.step(), srv.engine.stats().running)[1] == 0,
                   timeout=30)
    cancelled = [r.getMessage() for r in caplog.records if "cancelled after" in r.getMessage()]
    assert cancelled, [r.getMessage() for r in caplog.records]
    done, total = map(int, cancelled[0].split("after ")[1].split(" prompt")[0].split(" of "))
    assert done < total and cancelled[0].endswith(", 0 output tokens")


def test_a_disconnect_while_queued_means_the_request_never_runs(stepped, caplog):
    srv = stepped(max_running=1)
    with caplog.at_level(logging.INFO, logger="pensieve.engine"):
        with RawConnection(srv.port) as first:
            first.send(stream_request("Hello there"))
            wait_until(lambda: srv.engine.stats().running == 1)
            with RawConnection(srv.port) as second:
                second.send(stream_request("Queued"))
                wait_until(lambda: srv.engine.stats().waiting == 1)
            srv.engine.step()
            wait_until(lambda: (srv.engine.step(), srv.engine.stats().waiting)[1] == 0)
            messages = [r.getMessage() for r in caplog.records]
            assert any("cancelled while waiting" in m for m in messages), messages
            srv.engine.step(100)
            reply = first.read_response()  # the first request is unharmed
    assert [name for name, _ in sse_events(reply.body)][-1] == "message_stop"


# --- Graceful shutdown ----------------------------------------------------------------


def slow_stream(request):
    return [Accepted(3, 16), TextDelta("first"), 1.0, TextDelta(" second"), FINISHED]


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S).close()
        return False
    except ConnectionRefusedError:
        return True


def test_stop_lets_a_running_stream_finish_and_takes_nothing_new(scripted):
    srv = scripted(slow_stream)
    with RawConnection(srv.port) as idle, RawConnection(srv.port) as conn:
        idle.send(raw_request("GET", "/health"))
        assert idle.read_response().status == 200
        conn.send(raw_request(payload=body(stream=True)))
        conn.read_until(b'"text":"first"')
        srv.server.stop()
        wait_until(lambda: refused(srv.port))  # the listener is closed at once
        assert closed(idle.sock)  # idle keep-alive connections go at once
        events = rest_of_stream(conn)
    assert [name for name, _ in events][-2:] == ["message_delta", "message_stop"]
    srv.thread.join(HANG_GUARD_S)
    assert not srv.thread.is_alive() and srv.error is None


@pytest.mark.parametrize("stream", [True, False])
def test_past_the_drain_deadline_running_requests_end_with_an_error(scripted, stream):
    srv = scripted(endless, shutdown_timeout=0.3)
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body(stream=stream)))
        if stream:
            conn.read_until(b"content_block_delta")
        else:
            wait_until(lambda: srv.engine.jobs)
        srv.server.stop()
        if stream:
            name, error = rest_of_stream(conn)[-1]
            assert name == "error" and error["error"]["type"] == "overloaded_error"
        else:
            assert_error(conn.read_response(), 503, "overloaded_error")
    wait_until(lambda: srv.engine.jobs[0].cancelled.is_set())
    srv.thread.join(HANG_GUARD_S)
    assert not srv.thread.is_alive()


def test_a_second_stop_does_not_wait_for_the_deadline(scripted):
    srv = scripted(endless, shutdown_timeout=3600)
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body(stream=True)))
        conn.read_until(b"content_block_delta")
        srv.server.stop()
        time.sleep(0.2)
        assert srv.thread.is_alive()  # draining: the stream may go on
        srv.server.stop()
        name, _ = rest_of_stream(conn)[-1]
    assert name == "error"
    srv.thread.join(HANG_GUARD_S)
    assert not srv.thread.is_alive()


def test_stop_while_the_model_loads_returns_without_waiting_for_it():
    engine = SlowLoad()
    srv = ServerThread(Config(host="127.0.0.1", port=0), engine=engine)
    srv.thread.start()
    try:
        wait_until(lambda: srv.server.port is not None)
        srv.server.stop()
        srv.thread.join(HANG_GUARD_S)  # asyncio.run included: nothing left blocked
        assert not srv.thread.is_alive() and srv.error is None
        assert engine.stopped.is_set() and not srv.server.started.is_set()
    finally:
        engine.finish.set()


def start_process(args, cache, log):
    env = {**os.environ, "PENSIEVE_CACHE_DIR": str(cache), "PENSIEVE_LOG_LEVEL": "info"}
    return subprocess.Popen([sys.executable, str(ROOT / "pensieve.py"), *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.process
def test_sigterm_lets_a_stream_finish_then_exits_zero(roomy_model_dir, tmp_path):
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        proc = start_process(["--model", str(roomy_model_dir), "--port", str(port),
                              "--cpu-weights", "stored"], tmp_path, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        with RawConnection(port) as conn:
            conn.sock.settimeout(60)
            # Long enough to be running when the signal lands, well inside
            # the 30 s drain deadline.
            conn.send(stream_request(LONG_PROMPT, max_tokens=600))
            conn.read_until(b"content_block_delta")
            proc.send_signal(signal.SIGTERM)
            events = rest_of_stream(conn)
        # Finished in full within the drain deadline (30 s by default).
        assert [name for name, _ in events][-1] == "message_stop"
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    output = (tmp_path / "server.log").read_text()
    assert "Traceback" not in output and "shutting down" in output


@pytest.fixture(scope="module")
def roomy_model_dir(smollm_dir, tmp_path_factory):
    """The tiny model with an 8k window: room for answers that run for seconds."""
    out = tmp_path_factory.mktemp("roomy-model")
    write_tiny_llama(out, window=8192)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_dir / name, out / name)
    return out


@pytest.mark.process
def test_a_second_sigint_ends_running_streams_at_once(roomy_model_dir, tmp_path):
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        proc = start_process(["--model", str(roomy_model_dir), "--port", str(port),
                              "--cpu-weights", "stored", "--shutdown-timeout", "3600"],
                             tmp_path, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        with RawConnection(port) as conn:
            conn.sock.settimeout(60)
            conn.send(stream_request("Hello", max_tokens=8000))  # many seconds
            conn.read_until(b"content_block_delta")
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)  # draining: the stream goes on
            proc.send_signal(signal.SIGINT)
            events = rest_of_stream(conn)
        name, error = events[-1]
        assert name == "error" and error["error"]["type"] == "overloaded_error"
        assert proc.wait(30) == 0
    finally:
        proc.kill()


@pytest.mark.process
def test_sigterm_during_the_model_import_leaves_no_half_written_cache(smollm_dir,
                                                                      tmp_path):
    # The embedded GGUF is imported into PENSIEVE_CACHE_DIR on first use: a
    # stop in the middle leaves the model directory complete or absent, and
    # the next start clears what the interrupted import left behind.
    models = tmp_path / "models"
    with open(tmp_path / "first.log", "w") as log:
        proc = start_process(["--port", str(free_port())], tmp_path, log)
    try:
        deadline = time.monotonic() + 120
        while not (models.exists() and any(models.iterdir())):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    for entry in models.iterdir():
        if not entry.name.startswith("."):  # a finished import: complete
            assert {"config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json"} <= {p.name for p in entry.iterdir()}
    port = free_port()
    with open(tmp_path / "second.log", "w") as log:
        proc = start_process(["--port", str(port)], tmp_path, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        proc.wait(30)
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []
