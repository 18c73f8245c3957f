"""Continuous batching, cancellation and faults, on the tiny random model.

Engine-level tests read one timeline of messages from several jobs; a
``SteppedEngine`` runs one batch step per ``step()`` so that "in the middle
of a prompt" is a place a test can stop at, not a race. HTTP-level tests run
the real engine behind a real server and talk to it with the SDK or raw
sockets.
"""

import json
import logging
import queue
import socket
import threading
import time

import anthropic
import pytest
from helpers import API_KEY, FaultyEngine, ServerThread, SteppedEngine

from engine import (Accepted, Engine, Failed, Finished, GenerationRequest, TextDelta, Tool,
                    ToolCallEnd)
from pensieve import Config

TIMEOUT = 60  # a hang guard, not a timing assertion


def start(engine):
    engine.start()
    engine.wait_loaded(120)
    return engine


@pytest.fixture
def engines(tiny_model_dir):
    """Start engines on the tiny model: ``engines(Engine, max_running=1)``."""
    started = []

    def make(cls=Engine, **kw):
        engine = start(cls(str(tiny_model_dir), cpu_weights="stored", **kw))
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.stop(10)


def greedy(content="Hello there", **kw):
    return GenerationRequest(messages=(("user", content),), temperature=0.0,
                             **{"max_tokens": 12, **kw})


# A prompt of ~200 tokens: with a 16-token chunk it takes a dozen steps to read.
LONG_PROMPT = " ".join(f"item{i}" for i in range(60))


class Timeline:
    """Messages from several jobs, in the order the engine sent them."""

    def __init__(self):
        self.events = queue.Queue()
        self.seen = []

    def submit(self, engine, name, request):
        return engine.submit(request, lambda msg: self.events.put((name, msg)))

    def next(self):
        item = self.events.get(timeout=TIMEOUT)
        self.seen.append(item)
        return item

    def until(self, name, kind):
        """Read until job ``name`` sends a message of type ``kind``."""
        while True:
            who, msg = self.next()
            if who == name and isinstance(msg, kind):
                return msg

    def of(self, name):
        return [msg for who, msg in self.seen if who == name]

    def text(self, name):
        return "".join(m.text for m in self.of(name) if isinstance(m, TextDelta))


def solo_slot(engine):
    """The Slot of the request running solo, or None."""
    return engine._runners.solo.slot


def solo(engine, request):
    line = Timeline()
    line.submit(engine, "solo", request)
    done = line.until("solo", (Finished, Failed))
    return line.text("solo"), done


# --- Batching ----------------------------------------------------------------------


def test_requests_decode_together_each_with_its_own_settings(engines):
    engine = engines()
    text_a, done_a = solo(engine, greedy("Tell me about cats", max_tokens=6))
    text_b, _ = solo(engine, greedy("Tell me about dogs", max_tokens=40))
    stop = text_b[len(text_b) // 2: len(text_b) // 2 + 3]
    line = Timeline()
    line.submit(engine, "a", greedy("Tell me about cats", max_tokens=6))
    line.submit(engine, "b", greedy("Tell me about dogs", max_tokens=40,
                                    stop_sequences=(stop,)))
    line.submit(engine, "c", GenerationRequest(messages=(("user", "Hi"),), max_tokens=9,
                                               temperature=1.0, top_k=5, top_p=0.9))
    finished = {}
    while len(finished) < 3:
        who, msg = line.next()
        assert not isinstance(msg, Failed), msg
        if isinstance(msg, Finished):
            finished[who] = msg
    assert (finished["a"].stop_reason, finished["a"].output_tokens) == ("max_tokens", 6)
    assert line.text("a") == text_a  # batched greedy = greedy alone
    assert (finished["b"].stop_reason, finished["b"].stop_sequence) == ("stop_sequence",
                                                                       stop)
    assert line.text("b") == text_b[:text_b.index(stop)]
    assert finished["c"].output_tokens <= 9


def test_two_jobs_both_progress_before_either_finishes(engines):
    engine = engines()
    line = Timeline()
    line.submit(engine, "a", greedy("Tell me about cats", max_tokens=30))
    line.submit(engine, "b", greedy("Tell me about dogs", max_tokens=30))
    who, _ = next((w, m) for w, m in iter(line.next, None) if isinstance(m, Finished))
    assert [m for m in line.of("a") if isinstance(m, TextDelta)]
    assert [m for m in line.of("b") if isinstance(m, TextDelta)]


def test_a_long_prompt_is_read_in_slices_while_others_decode(engines):
    engine = engines(prefill_chunk=16)
    line = Timeline()
    line.submit(engine, "decoding", greedy(max_tokens=200))
    line.until("decoding", TextDelta)
    line.submit(engine, "reading", greedy(LONG_PROMPT, max_tokens=2))
    accepted = line.until("reading", Accepted)
    assert accepted.input_tokens > 150
    line.until("reading", Finished)
    after = line.seen[line.seen.index(("reading", accepted)):]
    # Reading ~200 tokens 16 at a time took a dozen steps, each with a decode
    # step for the other request.
    assert sum(1 for who, m in after if who == "decoding" and isinstance(m, TextDelta)) >= 5


def test_batch_holds_max_running_and_the_rest_wait(engines):
    engine = engines(SteppedEngine, max_running=2)
    line = Timeline()
    for name in "abc":
        line.submit(engine, name, greedy(f"Question {name}", max_tokens=50))
    for name in "abc":
        line.until(name, Accepted)
    engine.step()
    assert (engine.stats().running, engine.stats().waiting) == (2, 1)
    engine.step(1000)
    for name in "abc":
        if not line.of(name) or not isinstance(line.of(name)[-1], Finished):
            line.until(name, Finished)


def test_a_lone_request_moves_into_the_batch_and_back_without_losing_a_token(engines):
    engine = engines(SteppedEngine)
    alone, _ = solo(start_free(engines), greedy(max_tokens=60))
    line = Timeline()
    line.submit(engine, "long", greedy(max_tokens=60))
    line.until("long", Accepted)
    engine.step(10)  # reading, first token, then decoding alone
    wait_for(lambda: solo_slot(engine) is not None and solo_slot(engine).output_tokens >= 5)
    line.submit(engine, "short", greedy("Tell me about dogs", max_tokens=5))
    engine.step()  # the engine takes it in after the step it is waiting to run
    wait_for(lambda: solo_slot(engine) is None and engine.stats().running == 2)  # one batch
    engine.step(20)
    line.until("short", Finished)
    # The last one left in the batch runs alone again.
    wait_for(lambda: solo_slot(engine) is not None)
    assert solo_slot(engine).job.request.max_tokens == 60
    engine.step(1000)
    done = line.until("long", Finished)
    assert done.output_tokens == 60 and line.text("long") == alone


WEATHER = Tool("w", {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"]})


def test_a_constrained_request_keeps_its_grammar_through_batch_moves(engines):
    """The grammar mask follows a request from solo into the batch and back:
    the moves re-feed a token, which the grammar must not see twice."""
    engine = engines(SteppedEngine)
    call = greedy(max_tokens=40, tools=(WEATHER,), tool_choice="w", parallel_calls=False)
    free = start_free(engines)
    alone = Timeline()
    alone.submit(free, "alone", call)
    assert alone.until("alone", Accepted).constrained
    alone.until("alone", Finished)
    line = Timeline()
    line.submit(engine, "call", call)
    line.until("call", Accepted)
    engine.step(10)
    wait_for(lambda: solo_slot(engine) is not None and solo_slot(engine).output_tokens >= 4)
    line.submit(engine, "other", greedy("Tell me about dogs", max_tokens=4))
    engine.step()
    wait_for(lambda: solo_slot(engine) is None and engine.stats().running == 2)
    engine.step(10)
    line.until("other", Finished)
    wait_for(lambda: solo_slot(engine) is not None)
    engine.step(1000)
    done = line.until("call", Finished)
    assert line.of("call")[1:] == alone.of("alone")[1:-1] + [done]
    end = [m for m in line.of("call") if isinstance(m, ToolCallEnd)]
    assert done.stop_reason == "tool_use" and end[0].input["unit"] in ("c", "f")


def wait_for(predicate):
    for _ in range(TIMEOUT * 100):
        if predicate():
            return
        threading.Event().wait(0.01)
    raise AssertionError("condition not reached")


def start_free(engines):
    """An engine that runs freely beside a stepped one."""
    return engines()


# --- Cancellation ----------------------------------------------------------------


def test_cancel_mid_prompt_frees_the_slot_within_a_step(engines, caplog):
    caplog.set_level(logging.INFO, "pensieve.engine")
    engine = engines(SteppedEngine, max_running=1, prefill_chunk=16)
    line = Timeline()
    job = line.submit(engine, "long", greedy(LONG_PROMPT, max_tokens=5))
    total = line.until("long", Accepted).input_tokens
    engine.step(3)  # three 16-token slices of a ~200-token prompt
    while engine.stats().running != 1:
        pass
    job.cancel()
    line.submit(engine, "next", greedy(max_tokens=3))
    engine.step(1000)
    line.until("next", Finished)
    assert not [m for m in line.of("long") if isinstance(m, (TextDelta, Finished))]
    cancelled = [r.getMessage() for r in caplog.records if "cancelled after" in r.getMessage()]
    read = int(cancelled[0].split("after ")[1].split()[0])
    assert 0 < read < total - 16  # mid-prompt, and it read at most one more slice
    assert engine.stats().running == 0


def test_queued_request_whose_client_left_never_reaches_the_model(engines, caplog):
    caplog.set_level(logging.INFO, "pensieve.engine")
    engine = engines(SteppedEngine, max_running=1)
    line = Timeline()
    line.submit(engine, "running", greedy(max_tokens=20))
    queued = line.submit(engine, "queued", greedy("Another question", max_tokens=5))
    line.until("queued", Accepted)
    engine.step()
    assert engine.stats().waiting == 1
    queued.cancel()
    engine.step(1000)
    line.until("running", Finished)
    line.submit(engine, "after", greedy(max_tokens=2))
    line.until("after", Finished)
    assert [type(m) for m in line.of("queued")] == [Accepted]
    assert any(f"job {queued.id} cancelled while waiting" in r.getMessage()
               for r in caplog.records)


# --- Faults ----------------------------------------------------------------------------


def test_a_fault_in_one_request_fails_it_alone(engines):
    engine = engines(FaultyEngine)
    line = Timeline()
    line.submit(engine, "ok", greedy(max_tokens=40))
    line.submit(engine, "bad", greedy("FAULT here", max_tokens=40))
    assert line.until("bad", Failed) == Failed("internal",
                                               "generation failed: injected fault")
    assert isinstance(line.until("ok", Finished), Finished)
    _, done = solo(engine, greedy(max_tokens=3))
    assert isinstance(done, Finished)
    assert engine.stats().running == 0


def test_a_failed_batch_step_fails_its_requests_and_the_engine_goes_on(engines):
    engine = engines(FaultyEngine)
    line = Timeline()
    line.submit(engine, "a", greedy(max_tokens=100))
    line.submit(engine, "b", greedy("Another one", max_tokens=100))
    line.until("a", TextDelta)
    line.until("b", TextDelta)
    engine.break_batch = True
    for name in "ab":
        assert line.until(name, Failed).message == "generation failed: injected batch fault"
    text, done = solo(engine, greedy(max_tokens=5))
    assert isinstance(done, Finished) and done.output_tokens == 5


# --- Over HTTP -------------------------------------------------------------------------


@pytest.fixture
def serve(tiny_model_dir):
    """A real server on the tiny model: ``serve(engine_cls, **config)``."""
    servers = []

    def make(cls=Engine, prefill_chunk=None, **config):
        config = Config(host="127.0.0.1", port=0, model=str(tiny_model_dir),
                        cpu_weights="stored", **config)
        engine = cls(config.model, cpu_weights="stored", max_running=config.max_running,
                     prefill_chunk=prefill_chunk)
        srv = ServerThread(config, engine=engine).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


def client(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key=API_KEY, max_retries=0,
                               timeout=TIMEOUT)


def ask(content, max_tokens=20):
    return {"model": "m", "max_tokens": max_tokens, "extra_body": {"temperature": 0},
            "messages": [{"role": "user", "content": content}]}


def test_two_streams_both_progress_before_either_finishes(serve):
    srv = serve()
    events = queue.Queue()

    def stream(name, content):
        with client(srv).messages.stream(**ask(content, 40)) as s:
            for event in s:
                events.put((name, event.type))

    threads = [threading.Thread(target=stream, args=(n, c)) for n, c in
               (("a", "Tell me about cats"), ("b", "Tell me about dogs"))]
    for t in threads:
        t.start()
    seen = []
    while ("a", "message_stop") not in seen and ("b", "message_stop") not in seen:
        seen.append(events.get(timeout=TIMEOUT))
    for t in threads:
        t.join(TIMEOUT)
    assert ("a", "content_block_delta") in seen and ("b", "content_block_delta") in seen


def test_disconnect_frees_the_only_slot(serve):
    srv = serve(max_running=1, max_waiting=0)
    sock = socket.create_connection(("127.0.0.1", srv.port))
    payload = json.dumps({**ask("Tell me a long story", 200), "stream": True}).encode()
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: " + API_KEY.encode()
                 + b"\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    received = b""
    while b"content_block_delta" not in received:
        data = sock.recv(4096)
        assert data, received
        received += data
    sock.close()
    # The next request gets the slot (with no room to wait, it would get a
    # 529 if the abandoned stream still held it).
    for _ in range(50):
        try:
            msg = client(srv).messages.create(**ask("Hi", 3))
            break
        except anthropic.APIStatusError as e:
            assert e.status_code == 529  # the disconnect not noticed yet
            threading.Event().wait(0.1)
    assert msg.stop_reason in ("max_tokens", "end_turn")


def test_beyond_batch_and_line_is_529_at_once(serve):
    srv = serve(SteppedEngine, max_running=1, max_waiting=1)
    engine = srv.server.engine
    done = []

    def run(content):
        done.append(client(srv).messages.create(**ask(content, 3)))

    threads = [threading.Thread(target=run, args=(c,)) for c in ("one", "two")]
    for t in threads:
        t.start()
    # The engine holds its first step, so both stay: one in the batch, one in line.
    while engine.stats().running + engine.stats().waiting < 2:
        threading.Event().wait(0.01)
    with pytest.raises(anthropic.APIStatusError) as e:
        client(srv).messages.create(**ask("three", 3))
    assert e.value.status_code == 529
    assert e.value.body["error"]["type"] == "overloaded_error"
    assert int(e.value.response.headers["retry-after"]) > 0
    engine.step(1000)
    for t in threads:
        t.join(TIMEOUT)
    assert len(done) == 2


def test_injected_fault_fails_one_request_and_not_the_next(serve):
    srv = serve(FaultyEngine)
    c = client(srv)
    with pytest.raises(anthropic.InternalServerError) as e:
        c.messages.create(**ask("FAULT now", 20))
    assert e.value.body["error"]["type"] == "api_error"
    # The exception's text stays in the log, under the request id the client sees.
    assert "injected" not in e.value.body["error"]["message"]
    assert e.value.body["request_id"] in e.value.body["error"]["message"]
    with c.messages.with_streaming_response.create(**ask("FAULT again", 20),
                                                   stream=True) as response:
        lines = list(response.iter_lines())
    assert response.status_code == 200
    assert "event: error" in lines
    error = json.loads(lines[lines.index("event: error") + 1][len("data: "):])
    assert error["error"]["type"] == "api_error"
    msg = c.messages.create(**ask("All good", 3))
    assert msg.usage.output_tokens >= 1
    assert c.get("/health", cast_to=object)["running"] == 0


def batch_of_four_then_idle(engine, idle=lambda stats: not stats.running):
    """Four long prompts decoded together; the engine's stats once ``idle``."""
    line = Timeline()
    for i in range(4):
        line.submit(engine, i, greedy(f"{i} {LONG_PROMPT}", max_tokens=8))
    for i in range(4):
        line.until(i, Finished)
    deadline = time.monotonic() + TIMEOUT
    while not idle(engine.stats()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats()


def test_kept_caches_do_not_hold_the_batchs_buffers(engines):
    # A request's cache is cut out of the batch's; kept uncomputed, that
    # slice would hold the whole batch's buffers alive, far beyond the byte
    # bound the prompt cache counts.
    engine = engines(max_running=4)
    baseline = engine.stats().memory_active_bytes
    stats = batch_of_four_then_idle(engine)
    assert stats.prompt_cache_entries == 4
    # Besides the kept caches, mlx-lm holds the batch's last log-probabilities
    # (float32 over the vocabulary, one row per request); uncomputed slices
    # would add the whole batch's buffers (about twice this bound here).
    logprobs = 4 * engine._vocab_size * 4
    grown = stats.memory_active_bytes - baseline
    assert grown < stats.prompt_cache_bytes + logprobs + 256 * 1024


def test_an_idle_engine_hands_back_mlx_s_spare_buffers(engines):
    stats = batch_of_four_then_idle(
        engines(max_running=4), idle=lambda stats: not stats.memory_buffer_cache_bytes)
    assert stats.memory_buffer_cache_bytes == 0
