"""Fair prefill: a short request is not kept waiting behind a long prompt.

On the tiny random-weight model, an engine stepped by the test (one step of
work per ``step()``) records after every step how far each running request
has read its prompt and how many tokens it has made. A short request that
arrives while a long prompt is being read must get its first token before
that prompt is read, without waiting for its chunks (reading beside it, each
step is both prompts' work, and the short one's rows are padded to the long
one's depth); and the long prompt, passed over for starting requests, still
reads a chunk at least every PREFILL_YIELD_STEPS + 1 steps. Counts of chunks,
never timings.
"""

import queue
import time

import pytest

from engine import Accepted, Failed, Finished, GenerationRequest, TextDelta
from engine.engine import PREFILL_YIELD_STEPS
from helpers import SteppedEngine

CHUNK = 16
TIMEOUT = 60  # a hang guard, not a timing assertion
# ~200 tokens: a dozen chunks of 16 (the tiny model's window is 256).
LONG = " ".join(f"item{i}" for i in range(60))


class TracedEngine(SteppedEngine):
    """After each step: {job id: (prompt tokens unread, output tokens)}."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.trace = []

    def _advance(self):
        if not self._runners.running:
            return
        while not self._allowed.acquire(timeout=0.1):
            if self._stopping:
                return
        super(SteppedEngine, self)._advance()
        self.trace.append({slot.job.id: (slot.unread, slot.output_tokens)
                           for slot in self._runners.slots()})


@pytest.fixture
def traced(tiny_model_dir):
    engine = TracedEngine(str(tiny_model_dir), cpu_weights="stored",
                          prefill_chunk=CHUNK, max_running=8)
    engine.start()
    engine.wait_loaded(120)
    yield engine
    engine.stop(10)


def submit(engine, text, max_tokens=4):
    out = queue.Queue()
    job = engine.submit(GenerationRequest(messages=(("user", text),), temperature=0.0,
                                          max_tokens=max_tokens), out.put)
    return job, out


def step(engine):
    """One step; returns its record."""
    n = len(engine.trace)
    engine.step()
    deadline = time.monotonic() + TIMEOUT
    while len(engine.trace) == n:
        assert time.monotonic() < deadline, "the engine did not step"
        time.sleep(0.002)
    return engine.trace[-1]


def until_accepted(engine, out):
    """Step until ``out`` has its Accepted (the engine takes jobs in between steps)."""
    for _ in range(50):
        try:
            msg = out.get(timeout=0.05)
        except queue.Empty:
            step(engine)
            continue
        assert isinstance(msg, Accepted), msg
        return msg
    raise AssertionError("never accepted")


def drain(out):
    msgs = []
    while True:
        msg = out.get(timeout=TIMEOUT)
        msgs.append(msg)
        if isinstance(msg, (Finished, Failed)):
            return msgs


def test_a_short_request_starts_before_the_long_prompt_reads_on(traced):
    long_job, long_out = submit(traced, LONG)
    assert until_accepted(traced, long_out).input_tokens > 10 * CHUNK
    for _ in range(3):
        step(traced)
    short_job, short_out = submit(traced, "Hello there")
    until_accepted(traced, short_out)
    arrived = len(traced.trace)
    while traced.trace[-1].get(short_job.id, (0, 0))[1] == 0:
        assert len(traced.trace) - arrived < 40, traced.trace[arrived:]
        step(traced)
    during = traced.trace[arrived - 1:]
    long_unread = [record[long_job.id][0] for record in during]
    # Its first token came first: none of the long prompt's chunks were read
    # while the short one started (it needs fewer steps than the long one
    # yields), and the long one is still reading.
    assert long_unread[-1] == long_unread[0] > 1, during
    traced.step(1000)
    short, long = drain(short_out), drain(long_out)
    assert isinstance(short[-1], Finished) and isinstance(long[-1], Finished)
    assert [m for m in short if isinstance(m, TextDelta)]


def test_the_long_prompt_still_reads_while_short_requests_keep_arriving(traced):
    long_job, long_out = submit(traced, LONG)
    until_accepted(traced, long_out)
    step(traced)
    outs = []
    # A new short request at every step: there is always one starting.
    while traced.trace[-1].get(long_job.id, (0, 0))[0] > 1 and len(outs) < 150:
        outs.append(submit(traced, f"Hi {len(outs)}", max_tokens=1)[1])
        step(traced)
    assert traced.trace[-1][long_job.id][0] <= 1, "the long prompt was starved"
    # Between two of its chunks, at most PREFILL_YIELD_STEPS steps passed.
    unread = [record[long_job.id][0] for record in traced.trace if long_job.id in record]
    held, longest = 0, 0
    for before, after in zip(unread, unread[1:]):
        held = held + 1 if after == before else 0
        longest = max(longest, held)
    assert 0 < longest <= PREFILL_YIELD_STEPS, unread
    traced.step(1000)
    assert isinstance(drain(long_out)[-1], Finished)
    for out in outs:
        assert isinstance(drain(out)[-1], Finished)
