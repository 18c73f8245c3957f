"""Request bodies: none stalls the loop, their memory is bounded, framing costs bounded CPU.

Over real loopback sockets with a scripted engine: bodies of many JSON
values are parsed in the parse worker (the loop keeps answering meanwhile),
its answers equal the inline parse's, its errors keep their status and
message, it is replaced when killed and ended with the server; the
MAX_JSON_VALUES limit; the server-wide budget for bodies in flight; bodies
sent as 1-byte chunks. The stall itself is measured in bench/bench_loop_stall.py.

    .venv/bin/python -m pytest -q tests/test_bodies.py
"""

import json
import os
import signal
import subprocess

import pytest
from helpers import (FINISHED, RawConnection, assert_error, body, call,
                     raw_request, sse_events, wait_until)

import pensieve
from engine import Accepted, Counted, CountRequest, TextDelta
from pensieve import (INLINE_PARSE_VALUES, MAX_JSON_VALUES, json_values_bound,
                      parse_count_request, parse_messages_request)

COUNT = "/v1/messages/count_tokens"
CHUNKED = ["Content-Type: application/json", "Transfer-Encoding: chunked"]


def answer(request):
    if isinstance(request, CountRequest):
        return [Counted(7)]
    return [Accepted(3, request.max_tokens), TextDelta("Hello"), TextDelta(" world"),
            FINISHED]


def gone(pid):
    """Whether process ``pid`` has exited and been reaped (a zombie is not gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def workers():
    """The pids of this process's children that are parse workers, or that
    have exited unreaped (whose command line is gone)."""
    listing = subprocess.run(["ps", "-A", "-ww", "-o", "pid=,ppid=,stat=,args="],
                             capture_output=True, text=True, check=True).stdout
    found = set()
    for line in listing.splitlines():
        pid, ppid, stat, args = (line.split(None, 3) + [""])[:4]
        if int(ppid) == os.getpid() and ("parse_worker" in args or stat.startswith("Z")):
            found.add(int(pid))
    return found


def conversation(turns):
    """A body of ``turns`` rounds of every kind of turn the parser translates."""
    messages = []
    for i in range(turns):
        messages += [
            {"role": "user", "content": [{"type": "text", "text": f"step {i}"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "x"},
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": f"t{i}", "name": "Read",
                 "input": {"path": f"/f{i}", "lines": [1, 2, 3]}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": f"t{i}",
                 "content": [{"type": "text", "text": "a, b: c"}]},
                {"type": "text", "text": "go on"}]},
        ]
    tools = [{"name": "Read", "description": "read a file", "input_schema": {
        "type": "object", "properties": {"path": {"type": "string"}}}}]
    return body(messages=messages, tools=tools, system=[{"type": "text", "text": "sys"}],
                temperature=0.5, stop_sequences=["END"])


@pytest.fixture
def srv(scripted):
    return scripted(answer)


@pytest.fixture
def large():
    """A valid body well above the inline threshold, and its bytes."""
    raw = json.dumps(conversation(3000)).encode()
    assert json_values_bound(raw) > INLINE_PARSE_VALUES
    return raw


# --- The loop keeps answering ----------------------------------------------------


def test_while_a_worst_body_is_parsed_the_loop_keeps_answering(srv):
    # 1M values, the most allowed, all to translate: seconds of parsing.
    messages = [{"role": "user", "content": "x"}] * (MAX_JSON_VALUES // 3 - 10)
    raw = json.dumps(body(messages=messages)).encode()
    with RawConnection(srv.port) as big:
        big.sock.settimeout(60)
        big.send(raw_request(path=COUNT, payload=raw))
        wait_until(lambda: srv.server.api.bodies.worker.busy, timeout=30)
        # Meanwhile another connection is answered, and a stream runs to its end.
        assert call(srv, "GET", "/health").status == 200
        streamed = call(srv, "POST", "/v1/messages", body(stream=True))
        assert [name for name, _ in sse_events(streamed.body)][-1] == "message_stop"
        assert srv.server.api.bodies.worker.busy  # the big body is still being parsed
        reply = big.read_response()
    assert reply.status == 200 and reply.json == {"input_tokens": 7}
    counted = srv.engine.jobs[-1].request  # after the stream's
    assert counted == parse_count_request(raw)[1]
    assert counted.messages[0].text == "\n\n".join(["x"] * len(messages))


def test_the_worker_parses_as_the_loop_would(srv, large):
    reply = call(srv, "POST", "/v1/messages", large)
    assert reply.status == 200, reply.body
    assert srv.server.api.bodies.worker.pid is not None  # it went through the worker
    parsed = parse_messages_request(large, srv.server.config.default_temperature)
    assert srv.engine.jobs[-1].request == parsed.generation
    assert call(srv, "POST", COUNT, large).status == 200
    assert srv.engine.jobs[-1].request == parse_count_request(large)[1]


@pytest.mark.parametrize("payload, status, expected", [
    (b'{"model": "m", "messages": [' + b"{}," * 30000, 400,
     "request body is not valid JSON: Expecting value: line 1 column 90029 (char 90028)"),
    (json.dumps(body(messages=[{"role": "user", "content": "x"}] * 30000
                     + [{"role": "robot", "content": "x"}])).encode(), 400,
     "messages.30000.role: Input should be 'user', 'assistant' or 'system'"),
    (b'{"model": "m", "max_tokens": 1, "messages": [], "pad": [' + b"0," * 60000 + b"0]}",
     400, "messages: at least one message is required"),
    (b'{"model": "m", "pad": "\xff' + b"," * 60000 + b'"}', 400,
     "request body is not UTF-8: invalid start byte at byte 23"),
])
def test_errors_from_the_worker_keep_their_status_and_message(srv, payload, status,
                                                              expected):
    assert json_values_bound(payload) > INLINE_PARSE_VALUES
    message = assert_error(call(srv, "POST", "/v1/messages", payload), status,
                           "invalid_request_error")
    assert message == expected
    assert srv.server.api.bodies.worker.pid is not None


def test_a_killed_worker_is_replaced(srv, large):
    assert call(srv, "POST", COUNT, large).status == 200
    first = srv.server.api.bodies.worker.pid
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: gone(first))
    reply = call(srv, "POST", COUNT, large)
    assert reply.status == 200 and reply.json == {"input_tokens": 7}
    assert srv.server.api.bodies.worker.pid not in (None, first)


def test_no_worker_outlives_the_server(scripted, large):
    srv = scripted(answer)
    assert call(srv, "POST", COUNT, large).status == 200
    pid = srv.server.api.bodies.worker.pid
    assert workers() == {pid}
    srv.stop()
    assert not srv.thread.is_alive()
    assert gone(pid) and workers() == set()  # ended, and reaped, by the shutdown


def test_more_than_max_json_values_is_400_naming_the_limit(srv):
    pad = b"[" + b"0," * MAX_JSON_VALUES + b"0]"
    payload = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", ' \
              b'"content": "hi"}], "pad": ' + pad + b"}"
    for path in ("/v1/messages", COUNT):
        message = assert_error(call(srv, "POST", path, payload), 400,
                               "invalid_request_error")
        assert message == f"request body holds more than {MAX_JSON_VALUES} JSON values"
    assert srv.engine.jobs == []


# --- The budget for bodies in flight -----------------------------------------------


def test_bodies_past_the_memory_budget_get_503_until_room_is_made(scripted, monkeypatch):
    monkeypatch.setattr(pensieve, "BODY_WAIT_S", 0.2)
    srv = scripted(answer, body_memory_bytes=1000)
    held = json.dumps(body("x" * 800)).encode()
    with RawConnection(srv.port) as first:
        request = raw_request(payload=held)
        first.send(request[:-10])  # its head names 800-odd bytes: they are held
        wait_until(lambda: srv.server.api.bodies.budget.used > 0)
        reply = call(srv, "POST", "/v1/messages", body("y" * 300))
        message = assert_error(reply, 503, "overloaded_error")
        assert message == "request bodies in flight fill the server's 1000 bytes for " \
                          "them; retry shortly"
        assert reply.headers["retry-after"] == "2"
        first.send(request[-10:])
        assert first.read_response().status == 200
    assert srv.server.api.bodies.budget.used == 0  # handed back
    assert call(srv, "POST", "/v1/messages", body("y" * 300)).status == 200
    metrics = call(srv, "GET", "/metrics").body.decode()
    assert 'pensieve_requests_total{route="/v1/messages",status="503"} 1' in metrics


def test_a_chunked_body_is_charged_as_it_arrives(scripted, monkeypatch):
    monkeypatch.setattr(pensieve, "BODY_WAIT_S", 0.2)
    monkeypatch.setattr(pensieve, "BODY_CHARGE_STEP_BYTES", 100)
    srv = scripted(answer, body_memory_bytes=1000)
    with RawConnection(srv.port) as first:
        first.send(raw_request(headers=CHUNKED)
                   + b"3e8\r\n" + b" " * 1000 + b"\r\n")
        wait_until(lambda: srv.server.api.bodies.budget.used >= 1000)
        assert_error(call(srv, "POST", COUNT, body()), 503, "overloaded_error")
        first.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(json.dumps(body())),
                                               json.dumps(body()).encode()))
        assert first.read_response().status == 200
    assert srv.server.api.bodies.budget.used == 0


# --- 1-byte chunks ------------------------------------------------------------------


def one_byte_chunks(data):
    return b"".join(b"1\r\n%c\r\n" % c for c in data) + b"0\r\n\r\n"


def test_a_body_in_one_byte_chunks_parses(srv):
    text = "z" * (256 * 1024)
    with RawConnection(srv.port) as conn:
        conn.sock.settimeout(60)
        conn.send(raw_request(headers=CHUNKED)
                  + one_byte_chunks(json.dumps(body(text)).encode()))
        assert conn.read_response().status == 200
    assert srv.engine.jobs[0].request.messages[0].text == text


def test_a_body_in_too_many_chunks_is_400_and_close(srv, monkeypatch):
    monkeypatch.setattr(pensieve, "MAX_BODY_CHUNKS", 1000)
    with RawConnection(srv.port) as conn:
        conn.send(raw_request(headers=CHUNKED)
                  + one_byte_chunks(json.dumps(body("z" * 2000)).encode()))
        reply = conn.read_response()
        message = assert_error(reply, 400, "invalid_request_error")
        assert message == "request body sent in more than 1000 chunks; send it in " \
                          "larger ones"
        assert reply.headers["connection"] == "close"
        assert conn.outcome() == "closed"
    assert srv.engine.jobs == []


def test_a_worker_past_its_memory_bound_retires_after_answering(scripted, large,
                                                               monkeypatch):
    monkeypatch.setattr(pensieve, "PARSE_WORKER_RETIRE_BYTES", 1)  # every one retires
    srv = scripted(answer)
    for _ in range(2):
        reply = call(srv, "POST", COUNT, large)
        assert reply.status == 200 and reply.json == {"input_tokens": 7}
        # It exited after answering, and was reaped: its memory is the system's.
        assert srv.server.api.bodies.worker.pid is None
        assert workers() == set()


def test_a_worker_within_its_bound_is_kept(srv, large):
    for _ in range(2):
        assert call(srv, "POST", COUNT, large).status == 200
        assert workers() == {srv.server.api.bodies.worker.pid}


def test_answers_come_back_as_the_classes_of_the_module_running(large):
    # `python pensieve.py` runs this module as __main__, while the worker
    # imports it as pensieve: what comes back must be the running module's.
    import asyncio
    import importlib.util

    spec = importlib.util.spec_from_file_location("pensieve_as_main", pensieve.__file__)
    running = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(running)

    async def both():
        worker = running.ParseWorker()
        try:
            parsed = await worker.parse(running.parse_messages_request, large, (0.5,))
            with pytest.raises(running.ApiError) as refused:
                await worker.parse(running.parse_count_request, b"[" * 60000)
            return parsed, refused.value
        finally:
            await worker.close()

    parsed, error = asyncio.run(both())
    assert type(parsed) is running.MessagesRequest
    assert parsed == running.parse_messages_request(large, 0.5)
    assert (error.status, error.type) == (400, "invalid_request_error")
    assert error.message == "request body is nested deeper than 100 levels"


def test_the_budget_is_a_command_line_option():
    assert pensieve.parse_args(["--body-memory-mb", "64"]).config.body_memory_bytes \
        == 64 * 1024 * 1024
    assert pensieve.parse_args([]).config.body_memory_bytes == 4 * pensieve.MAX_BODY_BYTES
