"""The HTTP connection loop over real loopback sockets, with a scripted engine.

Covers routing, request ids, auth (checked before the body is read), request
validation, body and head limits, malformed HTTP fed whole and byte by byte,
keep-alive, SSE framing and event order (raw and through the anthropic SDK),
engine failures before and after the stream starts, disconnects that cancel
the engine job, overload (529), and the embedding API (``Server.serve()``,
no side effects on import).

Every exchange has a socket timeout as a hang guard; no test asserts timing.

    .venv/bin/python -m pytest -q tests/test_http.py
"""

import asyncio
import contextlib
import subprocess
import sys
import threading

import anthropic
import pytest
from helpers import (API_KEY, DROP, FINISHED, HANG_GUARD_S, MODEL, ROOT, RawConnection,
                     ScriptedEngine, assert_error, body, call, raw_request, sse_events,
                     wait_until)

import pensieve
from engine import Accepted, Failed, Finished, ModelError, TextDelta
from pensieve import (DEFAULT_MAX_RUNNING, DEFAULT_MAX_WAITING, MAX_BODY_BYTES,
                      Config, Server)


# --- Scripts -------------------------------------------------------------------


def hello(request):
    """The ScriptedEngine's default script: "Hello world" in two deltas."""
    return [Accepted(3, request.max_tokens), TextDelta("Hello"), TextDelta(" world"),
            FINISHED]


def slow_on(items):
    """A script that plays ``items`` for the prompt "slow", else ``hello``."""
    return lambda request: items if request.messages[-1].text == "slow" else hello(request)


# --- Clients -------------------------------------------------------------------


def sdk(srv, key=API_KEY):
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0,
                               timeout=HANG_GUARD_S)


@pytest.fixture
def srv(scripted):
    """A server on the default "Hello world" script."""
    return scripted()


# --- Routing and request ids ---------------------------------------------------


def test_health(srv):
    reply = call(srv, "GET", "/health")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    data = reply.json
    assert data["status"] == "healthy"
    assert (data["model"], data["context_window"], data["device"]) == ("scripted", 1000,
                                                                       "cpu")
    assert (data["running"], data["waiting"]) == (0, 0)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_root(srv, method):
    assert call(srv, method, "/").status == 200


def test_head_has_the_get_headers_and_no_body(srv):
    for path in ("/", "/health"):
        with RawConnection(srv.port) as conn:
            conn.send(raw_request("GET", path) + raw_request("HEAD", path)
                      + raw_request("GET", "/health"))
            get = conn.read_response()
            head = conn.read_response("HEAD")
            after = conn.read_response()  # the HEAD answer carried no body bytes
        assert head.status == 200
        assert head.headers["content-length"] == get.headers["content-length"] != "0"
        assert after.json["status"] == "healthy"


def test_query_string_is_ignored(srv):
    reply = call(srv, "POST", "/v1/messages?beta=true", body())
    assert reply.status == 200
    assert reply.json["content"][0]["text"] == "Hello world"


def test_unknown_path_is_404(srv):
    message = assert_error(call(srv, "GET", "/v1/nothing"), 404, "not_found_error")
    assert "/v1/nothing" in message


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/v1/messages", "POST"),
    ("DELETE", "/health", "GET, HEAD"),
])
def test_wrong_method_is_405(srv, method, path, allow):
    reply = call(srv, method, path)
    assert_error(reply, 405, "invalid_request_error")
    assert reply.headers["allow"] == allow


def test_every_response_has_a_fresh_request_id(srv):
    replies = [
        call(srv, "GET", "/health"),
        call(srv, "POST", "/v1/messages", body()),
        call(srv, "POST", "/v1/messages", body(stream=True)),
        call(srv, "GET", "/nowhere"),
        call(srv, "POST", "/v1/messages", body(), key=None),
        call(srv, "POST", "/v1/messages", b"{"),
    ]
    ids = [reply.headers["request-id"] for reply in replies]
    assert all(i.startswith("req_") for i in ids)
    assert len(set(ids)) == len(ids)
    for reply in replies:
        if reply.status >= 400:
            assert reply.json["request_id"] == reply.headers["request-id"]


# --- Auth ------------------------------------------------------------------------


@pytest.mark.parametrize("headers, status", [
    pytest.param({}, 401, id="missing"),
    pytest.param({"x-api-key": "wrong"}, 401, id="wrong-x-api-key"),
    pytest.param({"authorization": "Bearer wrong"}, 401, id="wrong-bearer"),
    pytest.param({"authorization": API_KEY}, 401, id="no-scheme"),
    pytest.param({"x-api-key": API_KEY}, 200, id="x-api-key"),
    pytest.param({"authorization": f"Bearer {API_KEY}"}, 200, id="bearer"),
])
def test_auth(srv, headers, status):
    reply = call(srv, "POST", "/v1/messages", body(), key=None, headers=headers)
    if status == 401:
        assert_error(reply, 401, "authentication_error")
        assert srv.engine.jobs == []
    else:
        assert reply.status == 200


def test_custom_key_refuses_the_default(scripted):
    srv = scripted(api_key="s3cret")
    assert_error(call(srv, "POST", "/v1/messages", body()), 401, "authentication_error")
    assert call(srv, "POST", "/v1/messages", body(), key="s3cret").status == 200


@pytest.mark.parametrize("key, status, error_type", [
    pytest.param("wrong", 401, "authentication_error", id="401-wrong-key"),
    pytest.param(API_KEY, 413, "request_too_large", id="413-over-limit"),
])
def test_answered_without_waiting_for_the_body(srv, key, status, error_type):
    """A promised body that never comes: the answer arrives anyway, then a close."""
    length = 1_000_000 if status == 401 else MAX_BODY_BYTES + 1
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(key=key, headers=["Content-Type: application/json",
                                                f"Content-Length: {length}"]))
        reply = conn.read_response()
    assert_error(reply, status, error_type)
    assert reply.headers["connection"] == "close"
    assert srv.engine.jobs == []


# --- Request validation ------------------------------------------------------------


@pytest.mark.parametrize("payload, names", [
    pytest.param(b"{", ["JSON"], id="invalid-json"),
    pytest.param(b"[]", ["JSON object"], id="array"),
    pytest.param(body(model=DROP), ["model"], id="no-model"),
    pytest.param(body(max_tokens=DROP), ["max_tokens"], id="no-max-tokens"),
    pytest.param(body(max_tokens=0), ["max_tokens"], id="max-tokens-0"),
    pytest.param(body(max_tokens="10"), ["max_tokens"], id="max-tokens-str"),
    pytest.param(body(messages=DROP), ["messages"], id="no-messages"),
    pytest.param(body(messages=[]), ["messages"], id="empty-messages"),
    pytest.param(body(messages=[{"role": "robot", "content": "hi"}]),
                 ["messages.0.role"], id="bad-role"),
    pytest.param(body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "AAAA"}}]}]),
                 ["messages.0.content.0", "text only"], id="image"),
    pytest.param(body(temperature=1.5), ["temperature"], id="temperature"),
    pytest.param(body(top_k=-1), ["top_k"], id="top-k"),
    pytest.param(body(stop_sequences="STOP"), ["stop_sequences"], id="stop-sequences"),
    pytest.param(body(system=5), ["system"], id="system"),
    pytest.param(b"", ["JSON"], id="empty"),
])
def test_bad_body_is_400_naming_the_field(srv, payload, names):
    message = assert_error(call(srv, "POST", "/v1/messages", payload), 400,
                           "invalid_request_error")
    for name in names:
        assert name in message
    assert srv.engine.jobs == []


# --- Keep-alive, malformed HTTP, byte-by-byte ---------------------------------------


@pytest.mark.parametrize("first, status", [
    pytest.param(raw_request(payload=b"{"), 400, id="after-400"),
    pytest.param(raw_request(payload=body()), 200, id="after-200"),
    pytest.param(raw_request(payload=body(stream=True)), 200, id="after-stream"),
])
def test_keep_alive(srv, first, status):
    with RawConnection(srv.port) as conn:
        conn.send(first)
        assert conn.read_response().status == status
        conn.send(raw_request(payload=body()))
        reply = conn.read_response()
    assert reply.status == 200
    assert reply.json["content"][0]["text"] == "Hello world"


async def _wait_for_as_in_python312(aw, timeout):
    """asyncio.wait_for as Python 3.12+ implements it: ``aw`` starts at once."""
    async with asyncio.timeout(timeout):
        return await aw


def test_keep_alive_with_python312_wait_for(srv, monkeypatch):
    monkeypatch.setattr(asyncio, "wait_for", _wait_for_as_in_python312)
    with RawConnection(srv.port) as conn:
        for _ in range(2):
            conn.send(raw_request(payload=body()))
            assert conn.read_response().status == 200


def test_pipelined_requests(srv):
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body()) + raw_request(payload=body(stream=True))
                  + raw_request("GET", "/health"))
        replies = [conn.read_response() for _ in range(3)]
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert replies[2].json["status"] == "healthy"


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("garbage", [
    pytest.param(b"HELLO\r\n\r\n", id="request-line"),
    pytest.param(b"\x00\xff\xfe\r\n\r\n", id="binary"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="no-host"),
    pytest.param(raw_request(headers=["Content-Length: abc"]), id="content-length-abc"),
    pytest.param(raw_request(headers=["Content-Length: -1"]), id="content-length-neg"),
    pytest.param(raw_request(headers=["Content-Length: 5", "Content-Length: 6"]),
                 id="content-length-twice"),
    pytest.param(raw_request(headers=["Transfer-Encoding: chunked"]) + b"zz\r\n",
                 id="bad-chunk"),
])
def test_malformed_http_is_4xx_or_close(srv, garbage, bytewise):
    with RawConnection(srv.port) as conn:
        try:
            conn.send(garbage, bytewise=bytewise)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the last byte
        outcome = conn.outcome()
    assert outcome == "closed" or 400 <= outcome < 500
    assert call(srv, "GET", "/health").status == 200


def test_request_fed_byte_by_byte(srv):
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body()), bytewise=True)
        reply = conn.read_response()
    assert reply.status == 200
    assert reply.json["content"][0]["text"] == "Hello world"


@pytest.mark.parametrize("complete", [False, True], ids=["unfinished", "in-one-piece"])
def test_oversized_head_is_a_client_error(srv, complete):
    with RawConnection(srv.port) as conn:
        # A head that never ends: the server reads it all, then refuses it.
        conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 70_000
                  + (b"\r\n\r\n" if complete else b""))
        reply = conn.read_response()
    assert reply.status == 431
    assert reply.json["error"]["type"] == "request_too_large"
    assert reply.json["error"]["message"] == "request head exceeds 65536 bytes"


# --- Responses: SSE and the SDK ----------------------------------------------------


def test_stream_events_in_order(srv):
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body(stream=True)))
        reply = conn.read_response()
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream"
    assert reply.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in reply.headers
    events = sse_events(reply.body)
    names = [name for name, _ in events]
    # Deltas that reach the event loop together may go out as one event.
    deltas = names.count("content_block_delta")
    assert deltas in (1, 2)
    assert names == ["message_start", "ping", "content_block_start"] + \
        ["content_block_delta"] * deltas + \
        ["content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["model"] == MODEL and start["id"].startswith("msg_")
    assert "".join(data["delta"]["text"] for name, data in events
                   if name == "content_block_delta") == "Hello world"
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == 2


def test_each_delta_is_sent_as_soon_as_it_is_produced(scripted):
    srv = scripted(lambda request: [Accepted(3, 16), TextDelta("early"), 30,
                                    TextDelta("late"), Finished("end_turn", None, 3, 2, 0, 0)])
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body(stream=True)))
        conn.read_until(b"\r\n\r\n")  # the response head
        conn.read_until(b'"text":"early"')  # arrives while the script still sleeps
        assert not srv.engine.jobs[0].cancelled.is_set()
        assert b"late" not in conn.buffer


def test_sdk_stream(srv):
    with sdk(srv).messages.stream(model=MODEL, max_tokens=16, messages=[
            {"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "Hello world"
    assert final.stop_reason == "end_turn"


def test_sdk_create(srv):
    message = sdk(srv).messages.create(model=MODEL, max_tokens=16, messages=[
        {"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello world"
    assert message.model == MODEL
    assert message.id.startswith("msg_")
    assert (message.stop_reason, message.usage.output_tokens) == ("end_turn", 2)


# --- Engine failures ---------------------------------------------------------------

TOO_LONG = "prompt is too long: 5000 tokens > 999 maximum"


@pytest.mark.parametrize("script, stream, status, error_type, message", [
    pytest.param([Failed("invalid_request", TOO_LONG)], False, 400,
                 "invalid_request_error", TOO_LONG, id="invalid"),
    pytest.param([Failed("invalid_request", TOO_LONG)], True, 400,
                 "invalid_request_error", TOO_LONG, id="invalid-stream"),
    pytest.param([Failed("internal", "boom at /secret/path.py")], False, 500,
                 "api_error", None, id="internal"),
    pytest.param([Accepted(3, 16), TextDelta("partial"),
                  Failed("internal", "boom at /secret/path.py")],
                 False, 500, "api_error", None, id="internal-after-accepted"),
])
def test_engine_failure_before_the_response(scripted, script, stream, status,
                                            error_type, message, caplog):
    srv = scripted(lambda request: script)
    reply = call(srv, "POST", "/v1/messages", body(stream=stream))
    said = assert_error(reply, status, error_type)
    if message is not None:
        assert said == message
    else:  # internals stay in the log, under the request id the client sees
        request_id = reply.headers["request-id"]
        assert "boom" not in said and "/secret" not in said and request_id in said
        assert any(request_id in r.getMessage() and "/secret/path.py" in r.getMessage()
                   for r in caplog.records)


def test_engine_failure_mid_stream_ends_the_stream_cleanly(scripted):
    srv = scripted(lambda request: [Accepted(3, 16), TextDelta("partial"),
                                    Failed("internal", "boom")])
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body(stream=True)))
        reply = conn.read_response()  # reads through the chunked terminator
        conn.send(raw_request("GET", "/health"))
        after = conn.read_response()
    assert reply.status == 200
    events = sse_events(reply.body)
    names = [name for name, _ in events]
    assert names[-2:] == ["content_block_delta", "error"]
    assert events[-2][1]["delta"]["text"] == "partial"
    error = events[-1][1]
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert error["request_id"] == reply.headers["request-id"]
    assert after.status == 200


# --- Disconnects and overload ------------------------------------------------------


@pytest.mark.parametrize("items, stream", [
    pytest.param([Accepted(3, 16), TextDelta("a"), 30, FINISHED], True,
                 id="mid-stream"),
    pytest.param([30, Accepted(3, 16), TextDelta("a"), FINISHED], False,
                 id="before-accepted"),
])
def test_disconnect_cancels_the_job(scripted, items, stream):
    srv = scripted(slow_on(items))
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body("slow", stream=stream)))
        if stream:
            conn.read_until(b'"text":"a"')
        else:
            wait_until(lambda: srv.engine.jobs)
    wait_until(lambda: srv.engine.jobs[0].cancelled.is_set())
    assert call(srv, "POST", "/v1/messages", body()).status == 200


@pytest.mark.parametrize("running, waiting, status", [
    (DEFAULT_MAX_RUNNING - 1, DEFAULT_MAX_WAITING, 200),
    (DEFAULT_MAX_RUNNING, DEFAULT_MAX_WAITING - 1, 200),
    (DEFAULT_MAX_RUNNING, DEFAULT_MAX_WAITING, 529),
])
def test_overload_is_529(scripted, running, waiting, status):
    # The requests in flight, counted by the server itself: each is held in
    # its script until its client leaves.
    srv = scripted(slow_on([Accepted(3, 16), 30, FINISHED]))
    held = running + waiting
    with contextlib.ExitStack() as stack:
        for _ in range(held):
            conn = stack.enter_context(RawConnection(srv.port))
            conn.send(raw_request(payload=body("slow")))
        wait_until(lambda: len(srv.server.api.jobs) == held)
        reply = call(srv, "POST", "/v1/messages", body())
        if status == 529:
            assert_error(reply, 529, "overloaded_error")
            assert int(reply.headers["retry-after"]) > 0
            assert len(srv.engine.jobs) == held  # the engine was not asked
        else:
            assert reply.status == 200


# --- The embedding API ---------------------------------------------------------------


async def _raw_exchange(port, request):
    """Send one request with Connection: close; return the whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), HANG_GUARD_S)
    finally:
        writer.close()


def test_serve_is_the_embedding_api():
    async def main():
        server = Server(Config(port=0), engine=ScriptedEngine())
        task = asyncio.create_task(server.serve())
        await asyncio.wait_for(server.started.wait(), HANG_GUARD_S)
        response = await _raw_exchange(server.port, raw_request(
            payload=body(), headers=["Connection: close"]))
        server.stop()
        await asyncio.wait_for(task, HANG_GUARD_S)
        return response

    response = asyncio.run(main())
    assert response.startswith(b"HTTP/1.1 200 ")
    assert b'"text": "Hello world"' in response


class LateLoad(ScriptedEngine):
    """A scripted engine whose model is loaded when the test says so."""

    def start(self, on_loaded=None):
        self.on_loaded = on_loaded

    def finish(self, error=None):
        threading.Thread(target=self.on_loaded,
                         args=(None if error else self.model, error)).start()


async def _serving_while_loading(engine):
    """(server, serve task, a request sent while the model loads), once
    that request has had time to be read."""
    server = Server(Config(port=0), engine=engine)
    task = asyncio.create_task(server.serve())
    while server.port is None:
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(_raw_exchange(server.port, raw_request(
        payload=body(), headers=["Connection: close"])))
    await asyncio.sleep(0.2)
    return server, task, waiting


def test_the_server_answers_while_its_model_loads():
    async def main():
        engine = LateLoad()
        server, task, waiting = await _serving_while_loading(engine)
        health = await _raw_exchange(server.port, raw_request(
            "GET", "/health", headers=["Connection: close"]))
        early = waiting.done()  # the request waits for the model
        engine.finish()
        answered = await asyncio.wait_for(waiting, HANG_GUARD_S)
        await asyncio.wait_for(server.started.wait(), HANG_GUARD_S)
        healthy = await _raw_exchange(server.port, raw_request(
            "GET", "/health", headers=["Connection: close"]))
        server.stop()
        await asyncio.wait_for(task, HANG_GUARD_S)
        return health, early, answered, healthy

    health, early, answered, healthy = asyncio.run(main())
    assert health.startswith(b"HTTP/1.1 503 ") and b'"status": "loading"' in health
    assert not early
    assert answered.startswith(b"HTTP/1.1 200 ") and b"Hello world" in answered
    assert healthy.startswith(b"HTTP/1.1 200 ") and b'"status": "healthy"' in healthy


def test_a_failed_load_answers_waiting_requests_and_ends_serve():
    async def main():
        engine = LateLoad()
        server, task, waiting = await _serving_while_loading(engine)
        engine.finish(ModelError("no such model"))
        answered = await asyncio.wait_for(waiting, HANG_GUARD_S)
        with pytest.raises(ModelError, match="no such model"):
            await asyncio.wait_for(task, HANG_GUARD_S)
        return answered

    answered = asyncio.run(main())
    assert answered.startswith(b"HTTP/1.1 503 ")
    assert b"the model failed to load: no such model" in answered


def test_started_can_be_awaited_right_after_creating_the_task():
    async def main():
        server = Server(Config(port=0), engine=ScriptedEngine())
        task = asyncio.create_task(server.serve())
        try:
            await asyncio.wait_for(server.started.wait(), HANG_GUARD_S)
        finally:
            task.cancel()

    asyncio.run(main())


@pytest.mark.process
def test_import_has_no_side_effects():
    code = ("import sys, threading, pensieve; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mlx', 'mlx_lm')), threading.active_count())")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.split() == ["[]", "1"]


def test_stop_returns_with_an_idle_keep_alive_connection_open():
    # Python 3.12+ makes Server.wait_closed() wait for open connections; an
    # idle pooled client must not keep serve() from returning.
    async def main():
        server = Server(Config(port=0), engine=ScriptedEngine())
        task = asyncio.create_task(server.serve())
        await asyncio.wait_for(server.started.wait(), HANG_GUARD_S)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw_request("GET", "/health"))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # answered; the connection stays open
        server.stop()
        await asyncio.wait_for(task, HANG_GUARD_S)
        writer.close()

    asyncio.run(main())


def test_stalled_body_is_408_and_close(srv, monkeypatch):
    monkeypatch.setattr(pensieve, "READ_TIMEOUT_S", 0.5)
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(headers=["Content-Type: application/json",
                                       "Content-Length: 100"]) + b'{"model":')
        reply = conn.read_response()
        assert conn.outcome() == "closed"
    assert_error(reply, 408, "invalid_request_error")
    assert reply.headers["connection"] == "close"
    assert srv.engine.jobs == []


# --- Claude Code's needs: pings, models ------------------------------------------


def test_pings_keep_a_slow_stream_alive(scripted, monkeypatch):
    monkeypatch.setattr(pensieve, "PING_INTERVAL_S", 0.2)
    srv = scripted(lambda request: [Accepted(3, 16), 1.0, TextDelta("late"), FINISHED])
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(payload=body(stream=True)))
        reply = conn.read_response()
    names = [name for name, _ in sse_events(reply.body)]
    assert names[0] == "message_start"
    first_delta = names.index("content_block_delta")
    assert names[:first_delta].count("ping") >= 3  # the initial one and the ticks
    assert names[-1] == "message_stop"


@pytest.fixture
def aliased(scripted):
    return scripted(aliases=(("claude-opus-4-8", "scripted"), ("gpt-9", "other-model")))


def test_models_list(aliased):
    reply = call(aliased, "GET", "/v1/models")
    assert reply.status == 200
    listing = reply.json
    ids = [m["id"] for m in listing["data"]]
    assert ids == ["scripted", "claude-pensieve", "claude-opus-4-8", "gpt-9"]
    assert listing["has_more"] is False
    assert (listing["first_id"], listing["last_id"]) == (ids[0], ids[-1])
    for entry in listing["data"]:
        assert entry["type"] == "model" and entry["display_name"] == entry["id"]
        assert entry["created_at"].endswith("Z")


def test_model_info_and_aliases(aliased):
    reply = call(aliased, "GET", "/v1/models/claude-sonnet-4-6?beta=true")
    assert reply.status == 200 and reply.json["id"] == "claude-sonnet-4-6"
    assert call(aliased, "GET", "/v1/models/claude-opus-4-8").status == 200
    assert_error(call(aliased, "GET", "/v1/models/gpt-9"), 404, "not_found_error")
    message = assert_error(call(aliased, "POST", "/v1/messages", body(model="gpt-9")),
                           404, "not_found_error")
    assert "other-model" in message
    ok = call(aliased, "POST", "/v1/messages", body(model="claude-opus-4-8"))
    assert ok.status == 200 and ok.json["model"] == "claude-opus-4-8"
    assert_error(call(aliased, "GET", "/v1/models", key="wrong"), 401,
                 "authentication_error")
