"""The engine thread: the one place where MLX runs.

Owns: loading the model, rendering prompts with the tokenizer's chat
template, prefill in chunks, decoding, stop sequences, and handing results
to the asyncio side through each request's ``asyncio.Queue``.

Never: touches sockets or awaits anything. It crosses to the event loop only
through ``loop.call_soon_threadsafe(queue.put_nowait, msg)`` with the frozen
message types below. Requests run one after another (batching comes later);
the waiting line is visible through ``Engine.stats``.
"""

import itertools
import logging
import queue as thread_queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from .models import ModelError, load, physical_memory
from .text import RenderError, StopMatcher, render_prompt

log = logging.getLogger("pensieve.engine")

# Prompt tokens processed per model call during prefill. Between chunks the
# engine takes new requests and notices cancellations, so this bounds how long
# a disconnect or an incoming request waits behind a long prompt.
PREFILL_CHUNK_CPU = 256
PREFILL_CHUNK_GPU = 2048
# Prompt cache: KV caches of finished requests, looked up by longest common
# prefix (mlx-lm's LRUPromptCache). Bounded by entries and by bytes; the byte
# default is a share of physical memory.
PROMPT_CACHE_ENTRIES = 16
PROMPT_CACHE_MEMORY_SHARE = 0.125
PROMPT_CACHE_KEY = "model"  # one model per engine
# How often an idle engine thread wakes to check that it should keep running.
IDLE_POLL_S = 0.5


# --- Requests and the messages sent back --------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, already validated by the HTTP side."""

    messages: tuple  # ((role, text), ...) with role in system/user/assistant
    max_tokens: int
    tools: tuple = ()  # Anthropic tool definitions: name, description, input_schema
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: tuple = ()


@dataclass(frozen=True)
class CountRequest:
    """Only count the tokens ``messages`` and ``tools`` would take as a prompt."""

    messages: tuple
    tools: tuple = ()


@dataclass(frozen=True)
class Counted:
    input_tokens: int


@dataclass(frozen=True)
class Accepted:
    """The prompt fits: its token count and the output budget after clamping."""

    input_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    stop_reason: str  # end_turn | max_tokens | stop_sequence
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int
    time_to_first_token: float
    decode_tps: float
    cached_tokens: int = 0  # of input_tokens, taken from the prompt cache


@dataclass(frozen=True)
class Failed:
    kind: str  # "invalid_request" (a 400) or "internal" (a 500)
    message: str


class Job:
    """A request in flight. ``cancel()`` may be called from any thread."""

    _ids = itertools.count(1)

    def __init__(self, request, deliver):
        self.id = next(self._ids)
        self.request = request
        self.deliver = deliver
        self.cancelled = False

    def cancel(self):
        # A plain attribute write is atomic under the GIL; the engine reads it
        # between decode steps and between prefill chunks.
        self.cancelled = True


# --- The engine ---------------------------------------------------------------


class Engine:
    """Runs all model work on one dedicated thread.

    ``start()`` launches the thread, which loads the model; ``submit()`` queues
    a request and returns its Job; ``stop()`` ends the thread.
    """

    def __init__(self, model_spec=None, cpu_weights="float32", cache_bytes=None):
        self._spec = model_spec
        self._cpu_weights = cpu_weights
        self._cache_bytes = cache_bytes
        self._inbox = thread_queue.SimpleQueue()
        self._waiting = deque()
        self._thread = None
        self._stopping = False
        self._loaded = threading.Event()
        self._prompt_cache = None  # made on the engine thread once loaded
        self.model = None
        self.load_error = None
        self.running = 0

    # Public API, callable from any thread.

    def start(self):
        self._thread = threading.Thread(target=self._run, name="pensieve-engine",
                                        daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout=None):
        """Block until the model is loaded; raise its ModelError if it failed."""
        if not self._loaded.wait(timeout):
            raise TimeoutError("the model is still loading")
        if self.load_error is not None:
            raise self.load_error
        return self.model

    def submit(self, request, deliver):
        """Queue ``request``; ``deliver(msg)`` is called on the engine thread."""
        job = Job(request, deliver)
        self._inbox.put(job)
        return job

    def stop(self, timeout=None):
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self):
        cache = self._prompt_cache
        return {"running": self.running,
                "waiting": len(self._waiting) + self._inbox.qsize(),
                "prompt_cache_entries": len(cache) if cache is not None else 0,
                "prompt_cache_bytes": cache.nbytes if cache is not None else 0}

    # The thread.

    def _run(self):
        try:
            self.model = load(self._spec, cpu_weights=self._cpu_weights)
        except ModelError as e:
            self.load_error = e
        except Exception as e:  # a bug or an MLX failure: report, do not hang
            log.exception("model load failed")
            self.load_error = ModelError(f"model load failed: {e}")
        self._loaded.set()
        if self.load_error is not None:
            return
        self._prefill_chunk = (PREFILL_CHUNK_CPU if self.model.device == "cpu"
                               else PREFILL_CHUNK_GPU)
        self._vocab_size = len(self.model.tokenizer.vocab)  # ~20 ms: once
        import mlx.core as mx
        from mlx_lm.models.cache import LRUPromptCache

        self._prompt_cache = LRUPromptCache(
            max_size=PROMPT_CACHE_ENTRIES,
            max_bytes=self._cache_bytes if self._cache_bytes is not None
            else int(min(PROMPT_CACHE_MEMORY_SHARE * physical_memory(), 1 << 62)))

        # This thread's default stream, as mlx-lm's own server uses: mlx-lm's
        # module-level thread-local stream, used from a non-main thread,
        # aborts the process at interpreter exit ("terminate called without
        # an active exception"), and so does a stream from mx.new_stream.
        self._stream = mx.default_stream(mx.default_device())
        while not self._stopping:
            self._take_inbox(block=not self._waiting)
            while self._waiting and not self._stopping:
                job, prompt, max_tokens = self._waiting.popleft()
                if job.cancelled:
                    log.info("job %d cancelled while waiting", job.id)
                    continue
                self.running = 1
                try:
                    self._generate(job, prompt, max_tokens)
                except Exception as e:
                    log.exception("generation failed (job %d)", job.id)
                    job.deliver(Failed("internal", f"generation failed: {e}"))
                finally:
                    self.running = 0
                self._take_inbox(block=False)

    def _take_inbox(self, block):
        """Tokenize newly submitted requests and queue those that fit."""
        while True:
            try:
                job = self._inbox.get(block=block, timeout=IDLE_POLL_S if block else None)
            except thread_queue.Empty:
                return
            if job is None or self._stopping:
                return
            block = False
            if not job.cancelled:
                self._admit(job)

    def _admit(self, job):
        try:
            prompt = render_prompt(self.model.tokenizer, job.request.messages,
                                   job.request.tools)
        except RenderError as e:
            job.deliver(Failed("invalid_request", str(e)))
            return
        except Exception as e:  # a tokenizer bug must not end the engine thread
            log.exception("rendering failed (job %d)", job.id)
            job.deliver(Failed("internal", f"prompt rendering failed: {e}"))
            return
        if isinstance(job.request, CountRequest):
            # The same rendering generation uses, so the numbers agree; a
            # count may exceed the window (clients count to decide to compact).
            job.deliver(Counted(len(prompt)))
            return
        window = self.model.context_window
        # At least one token of room must be left for the answer.
        if len(prompt) >= window:
            job.deliver(Failed("invalid_request",
                               f"prompt is too long: {len(prompt)} tokens > "
                               f"{window - 1} maximum"))
            return
        max_tokens = min(job.request.max_tokens, window - len(prompt))
        job.deliver(Accepted(len(prompt), max_tokens))
        self._waiting.append((job, prompt, max_tokens))

    def _generate(self, job, prompt, max_tokens):
        import mlx.core as mx

        started = time.perf_counter()
        cache, rest = self._cached_prefix(prompt)
        reused = len(prompt) - len(rest)
        answer = []  # the tokens generated, for the prompt cache
        tokens = mx.array(rest)
        outcome = None
        if self._prefill(job, tokens, cache):
            outcome = self._decode(job, tokens[-1:], cache, max_tokens, answer)
        # Whatever the cache holds, a prefix of prompt + answer, serves the next
        # request that starts the same way (the next turn of a chat), also
        # after a cancellation. Not after an exception: its state is unknown.
        held = cache[0].offset if cache else 0
        if held:
            self._prompt_cache.insert_cache(PROMPT_CACHE_KEY, (prompt + answer)[:held],
                                            cache)
        if outcome is None:
            return
        stop_reason, stop_sequence, output_tokens, first_token_at = outcome
        decode_s = time.perf_counter() - first_token_at
        job.deliver(Finished(
            stop_reason, stop_sequence, len(prompt), output_tokens,
            time_to_first_token=first_token_at - started,
            decode_tps=(output_tokens - 1) / decode_s if decode_s > 0 else 0.0,
            cached_tokens=reused))

    def _cached_prefix(self, prompt):
        """A KV cache holding the longest stored prefix of ``prompt``, and the
        prompt tokens still to process (at least one: its logits are needed)."""
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        cache, rest = self._prompt_cache.fetch_nearest_cache(PROMPT_CACHE_KEY, prompt)
        if cache is None:
            return make_prompt_cache(self.model.model), prompt
        if not rest:  # the whole prompt was stored: recompute its last token
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def _prefill(self, job, tokens, cache):
        """Run all but the last prompt token through the model, in chunks.

        Between chunks the engine notices cancellation and answers new
        arrivals. Returns False if the job was cancelled.
        """
        import mlx.core as mx

        total = len(tokens)
        for start in range(0, total - 1, self._prefill_chunk):
            if job.cancelled or self._stopping:
                log.info("job %d cancelled during prefill at token %d of %d",
                         job.id, start, total)
                return False
            end = min(start + self._prefill_chunk, total - 1)
            with mx.stream(self._stream):
                self.model.model(tokens[None, start:end], cache=cache)
                mx.eval([c.state for c in cache])
            self._take_inbox(block=False)
        return True

    def _tokens(self, last_token, cache, sampler, max_tokens):
        """The answer's token ids, lazily.

        The first is computed on its own, so it reaches the client before the
        second starts computing: on a CPU that work takes every core, and the
        event loop would otherwise wait for one (measured: 7-20 ms added to
        the first token on 2 cores). The rest come from mlx-lm's pipelined
        generate_step, which overlaps each step with the next.
        """
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        with mx.stream(self._stream):
            logits = self.model.model(last_token[None], cache=cache)[:, -1, :]
            first = sampler(logits - mx.logsumexp(logits, keepdims=True)).item()
        yield first
        if max_tokens > 1:
            steps = generate_step(mx.array([first]), self.model.model,
                                  stream=self._stream, prompt_cache=cache,
                                  sampler=sampler, max_tokens=max_tokens - 1)
            try:
                for token, _ in steps:
                    yield int(token)
            finally:
                steps.close()

    def _decode(self, job, last_token, cache, max_tokens, answer):
        """Feed the last prompt token and stream the answer through mlx-lm's
        pipelined decode loop, appending each token to ``answer``. Returns
        (stop_reason, stop_sequence, output tokens, first token time), or None
        if the job was cancelled."""
        from mlx_lm.sample_utils import make_sampler

        req, tokenizer = job.request, self.model.tokenizer
        # top_k beyond the vocabulary means "no limit" (argpartition would fail).
        top_k = req.top_k if req.top_k and req.top_k < self._vocab_size else 0
        sampler = make_sampler(temp=req.temperature, top_p=req.top_p or 0.0,
                               top_k=top_k)
        detokenizer = tokenizer.detokenizer
        stops = StopMatcher(req.stop_sequences)
        steps = self._tokens(last_token, cache, sampler, max_tokens)
        first_token_at = None
        output_tokens = 0
        stop_reason = "max_tokens"
        try:
            for token in steps:
                if not self._inbox.empty():
                    # Answer newcomers (Accepted, or a 400) while this one decodes.
                    self._take_inbox(block=False)
                if job.cancelled or self._stopping:
                    log.info("job %d cancelled after %d output tokens", job.id,
                             output_tokens)
                    return None
                answer.append(token)
                output_tokens += 1
                first_token_at = first_token_at or time.perf_counter()
                if token in tokenizer.eos_token_ids:
                    stop_reason = "end_turn"
                    break
                detokenizer.add_token(token)
                if req.stop_sequences:
                    text, matched = stops.feed(detokenizer.last_segment)
                else:  # the common case: nothing to hold back
                    text, matched = detokenizer.last_segment, None
                if text:
                    job.deliver(TextDelta(text))
                if matched is not None:
                    return "stop_sequence", matched, output_tokens, first_token_at
        finally:
            steps.close()
        # The detokenizer's and the matcher's held-back text (a stop sequence
        # may still complete in the detokenizer's last piece).
        detokenizer.finalize()
        text, matched = stops.feed(detokenizer.last_segment)
        if matched is None:
            text += stops.flush()
        if text:
            job.deliver(TextDelta(text))
        if matched is not None:
            return "stop_sequence", matched, output_tokens, first_token_at
        return stop_reason, None, output_tokens, first_token_at
