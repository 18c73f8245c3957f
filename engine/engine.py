"""The engine thread: the one place where MLX runs.

Owns: the thread and the engine's public API (``Engine``: start, submit,
stats, stop), loading the model, taking in the requests the prompt threads
prepared (engine/prompts.py renders, tokenizes, checks the window and
answers counts; here each becomes a Slot), the scheduler's policy (who
waits, who runs solo or batched, within the KV budget), the prompt cache of
finished requests' KV caches (``PromptCache``), and the ``Stats`` snapshot
it publishes.

Never: touches sockets or awaits anything, calls the model itself
(engine/runners.py does), or lets another thread read its containers: it
crosses to the event loop only through each job's ``deliver`` (the server's
``loop.call_soon_threadsafe(queue.put_nowait, msg)``) with the frozen types
of engine/messages.py, ``on_loaded`` once, and the published ``Stats``.

Requests decode together in one batch; a request alone runs "solo" instead
(engine/runners.py says why); the scheduler decides which, between two
steps. Prompts are read a slice per step, so a long prompt slows the others'
decoding but does not stop it; one longer than a chunk is read apart from
the batch, and holds back while a shorter one starts (fair prefill).
Finished requests leave their KV cache in an LRU store bounded in bytes; a
new request starts from the longest stored prefix of its tokens. More
requests than the batch holds, or than the KV budget holds, wait in line,
visible through ``Engine.stats``.
"""

import dataclasses
import itertools
import logging
import queue as thread_queue
import threading
import time
from collections import deque
from typing import Callable

from .messages import CountRequest, Failed, GenerationRequest, OnLoaded, Stats
from .models import (DEFAULT_ROPE_SCALING, LoadedModel, ModelError, load,
                     physical_memory, trim_heap)
from .prompts import Admission, Prompts
from .runners import Runners, State, warm_up
from .slot import OutputStyle, Slot

log = logging.getLogger("pensieve.engine")

# Prompt tokens read per engine step, shared among the prompts being read
# while others decode (each prompt gets a whole chunk when none do). Between
# steps the engine takes new requests and notices cancellations, and the
# running requests decode one token, so this bounds how long any of them
# waits behind a long prompt.
PREFILL_CHUNK_CPU = 256
PREFILL_CHUNK_GPU = 2048
# Fair prefill: a prompt longer than a chunk is read apart from the batch,
# and while a request with a shorter prompt is starting (not yet at its first
# token) it holds back, for at most this many steps in a row. A short request
# arriving behind a full-window prompt then starts without waiting for any of
# its chunks (read beside it, each of its steps would cost both prompts'
# chunks, its rows padded to the long one's depth), and a stream of short
# requests slows the long prompt to one chunk in K + 1 steps, never stops it.
PREFILL_YIELD_STEPS = 6
# Requests decoding together; more wait in line (the server bounds the line).
DEFAULT_MAX_RUNNING = 32
# Prompt cache: KV caches of finished requests, looked up by longest common
# prefix (mlx-lm's LRUPromptCache). Bounded by entries and by bytes; the byte
# default is a share of physical memory.
PROMPT_CACHE_ENTRIES = 64
PROMPT_CACHE_MEMORY_SHARE = 0.125
PROMPT_CACHE_KEY = "model"  # one model per engine
# How often an idle engine thread wakes to check that it should keep running.
IDLE_POLL_S = 0.5
# KV cache the running requests may hold together, as a share of the memory
# (the GPU's where it says, else the machine's): each request reserves what
# its prompt and max_tokens can fill (a full 32k request on the embedded CPU
# model: 1.4 GiB of float32 KV), and one that would not fit waits.
KV_MEMORY_SHARE = 0.25
# Stats are published when who runs, who waits or the prompt cache changes,
# and when the engine goes idle; besides, at least this often while requests
# run (MLX's memory figures move with every token, and a snapshot per token
# would cost every token).
STATS_REFRESH_S = 0.5


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
        # between steps (one decode step and at most one prefill slice).
        self.cancelled = True


def _log_cancelled(slot):
    log.info("job %d cancelled after %d of %d prompt tokens, %d output tokens",
             slot.job.id, len(slot.prompt) - slot.unread, len(slot.prompt),
             slot.output_tokens)


class Engine:
    """Runs all model work on one dedicated thread.

    ``start(on_loaded)`` launches the thread, which loads the model and
    reports the outcome; ``submit()`` queues a request and returns its Job;
    ``stats()`` is the latest published snapshot; ``stop()`` ends the thread.
    ``slot_type``: the Slot class accepted requests get.
    """

    slot_type = Slot

    def __init__(self, model_spec: str | None = None, cpu_weights: str = "float32",
                 cache_bytes: int | None = None, max_running: int = DEFAULT_MAX_RUNNING,
                 prefill_chunk: int | None = None, constrain: bool = True,
                 context_window: int | None = None,
                 rope_scaling: str = DEFAULT_ROPE_SCALING, kv_bytes: int | None = None,
                 cache_dir: str | None = None):
        self._spec = model_spec
        self._window = context_window  # None: the model's (see models.load)
        self._rope_scaling = rope_scaling
        self._cache_dir = cache_dir  # where GGUF imports live (None: the default)
        self._kv_budget = kv_bytes  # None: KV_MEMORY_SHARE of the memory, once loaded
        self._kv_per_token = 0
        # Grammar-constrained tool calls and JSON answers, when llguidance is
        # installed; ``self.constrained`` says whether they are on once loaded.
        self._constrain = constrain
        self.constrained = False
        self._prefill_chunk = prefill_chunk  # None: by device, once loaded
        self._cpu_weights = cpu_weights
        self._cache_bytes = cache_bytes
        self._max_running = max_running
        self._inbox = thread_queue.SimpleQueue()  # lists of Prepared, from the prompts
        self._prompts = Prompts(hand_over=self._inbox.put)
        self._waiting = deque()  # Slots accepted, not yet running
        self._held_back = 0  # steps in a row the prompt read aside has yielded
        self._runners = None  # made on the engine thread once loaded
        self._prompt_cache = None  # likewise
        self._thread = None
        self._stopping = False
        self._loaded = threading.Event()
        self._stats = Stats(max_running=max_running, kv_budget_bytes=kv_bytes or 0)
        # What the last snapshot showed of what changes it, and when it was made.
        self._published_key, self._published_at = None, 0.0
        self.model = None  # the LoadedModel, once loaded
        self.info = None  # its ModelInfo
        self.load_error = None

    # Public API, callable from any thread.

    def start(self, on_loaded: OnLoaded | None = None) -> None:
        """Start the thread; it loads the model, then calls, on itself,
        ``on_loaded(ModelInfo, None)`` or ``on_loaded(None, ModelError)``."""
        self._thread = threading.Thread(target=self._run, args=(on_loaded,),
                                        name="pensieve-engine", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> LoadedModel:
        """Block until the model is loaded (its LoadedModel); raise its
        ModelError if it failed."""
        if not self._loaded.wait(timeout):
            raise TimeoutError("the model is still loading")
        if self.load_error is not None:
            raise self.load_error
        return self.model

    def submit(self, request: GenerationRequest | CountRequest,
               deliver: Callable[[object], None]) -> Job:
        """Queue ``request``; ``deliver(msg)`` is called on the engine thread
        or a prompt thread (engine/prompts.py), one at a time, in order."""
        job = Job(request, deliver)
        self._prompts.submit(job)
        return job

    def stop(self, timeout: float | None = None) -> None:
        self._stopping = True
        self._prompts.stop(timeout)
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> Stats:
        """The snapshot the engine thread published last; ``waiting`` also
        counts the generation jobs submitted and not yet taken in."""
        stats, queued = self._stats, self._prompts.pending
        return dataclasses.replace(stats, waiting=stats.waiting + queued) if queued else stats

    # The thread.

    def _run(self, on_loaded):
        self.load_error = self._load()
        self._loaded.set()
        if on_loaded is not None:
            try:
                on_loaded(self.info if self.load_error is None else None, self.load_error)
            except Exception:
                log.exception("the on_loaded callback failed")
        if self.load_error is None:
            self._serve()

    def _load(self):
        """Load the model and prepare to serve it; the ModelError, or None."""
        try:
            self.model = load(self._spec, cpu_weights=self._cpu_weights,
                              context_window=self._window,
                              rope_scaling=self._rope_scaling, cache_dir=self._cache_dir)
        except ModelError as e:
            return e
        except Exception as e:  # a bug or an MLX failure: report, do not hang
            log.exception("model load failed")
            return ModelError(f"model load failed: {e}")
        try:
            self._prepare()
        except ModelError as e:
            return e
        except Exception as e:
            log.exception("engine set-up failed")
            return ModelError(f"engine set-up failed: {e}")
        return None

    def _prepare(self):
        """Everything that depends on the loaded model, before serving."""
        model = self.model
        if self._prefill_chunk is None:
            self._prefill_chunk = (PREFILL_CHUNK_CPU if model.device == "cpu"
                                   else PREFILL_CHUNK_GPU)
        self._vocab_size = len(model.tokenizer.vocab)  # ~20 ms: once
        style = OutputStyle(model.tokenizer, self._vocab_size, self._constrain)
        self.constrained = style.constrained
        self._prompt_cache = PromptCache(
            model, self._cache_bytes if self._cache_bytes is not None
            else int(min(PROMPT_CACHE_MEMORY_SHARE * physical_memory(), 1 << 62)))
        self._kv_per_token = warm_up(model.model, model.tokenizer)
        self._size_kv()
        self._style = style
        self._prompts.start(lambda: Admission(model, style, self._kv_per_token))
        self._runners = Runners(model, self._prefill_chunk, self._max_running,
                                ended=self._ended)
        self.info = model.info
        self._publish()

    def _size_kv(self):
        """The KV budget of running requests; it must hold one full window."""
        import mlx.core as mx

        if self._kv_budget is None:
            memory = mx.device_info().get("memory_size") or physical_memory()
            self._kv_budget = int(min(KV_MEMORY_SHARE * memory, 1 << 62))
        window = self.model.context_window
        full = self._kv_per_token * window
        if full > self._kv_budget:
            raise ModelError(
                f"one {window}-token request needs {full / 2**30:.1f} GiB of KV "
                f"cache, more than the {self._kv_budget / 2**30:.1f} GiB kept for "
                "it; serve a smaller --context-window or raise --kv-memory-mb")
        log.info("KV cache: %d bytes a token; %.1f GiB for running requests (%d full "
                 "windows)", self._kv_per_token, self._kv_budget / 2**30,
                 self._kv_budget // max(full, 1))

    def _serve(self):
        import mlx.core as mx

        worked = False
        try:
            while not self._stopping:
                idle = not (self._waiting or self._runners.running)
                if idle and worked:
                    # MLX keeps freed work buffers (a batch's prefill logits
                    # run to hundreds of MB) for reuse; with nothing to do,
                    # give them back, so an idle server's memory is the model
                    # and the prompt cache.
                    mx.clear_cache()
                    trim_heap()
                    worked = False
                    self._publish()
                self._take_inbox(block=idle)
                self._drop_cancelled()
                self._schedule()
                # Published when what it shows has changed (inline: this runs
                # between every two steps).
                running = self._runners.running
                if self._shown() != self._published_key or (
                        running and time.monotonic() - self._published_at
                        >= STATS_REFRESH_S):
                    self._publish()
                if not self._stopping:
                    worked = worked or bool(running)
                    self._advance()
        finally:
            self._runners.close()

    def _advance(self):
        """One step of work: for the batch, and for the solo request unless
        its prompt, read aside, holds back this step (``_aside_reads``)."""
        self._runners.step(read_aside=self._aside_reads())

    def _aside_reads(self):
        """Fair prefill: whether the prompt read aside reads a chunk this step.
        Not while a request with a shorter prompt is starting in the batch
        (it goes first), for at most PREFILL_YIELD_STEPS steps in a row."""
        aside = self._runners.reading_aside()
        starting = aside is not None and any(
            slot.output_tokens == 0 and slot.unread < aside.unread
            for slot in self._runners.batch.slots())
        if starting and self._held_back < PREFILL_YIELD_STEPS:
            self._held_back += 1
            return False
        self._held_back = 0
        return True

    # Stats: published by this thread, read by any.

    def _shown(self):
        """What a snapshot shows that decides when to publish the next."""
        return len(self._waiting), self._runners.running, self._prompt_cache.stored

    def _publish(self):
        import mlx.core as mx

        cache, running = self._prompt_cache, self._runners.running
        self._published_key = self._shown()
        self._published_at = time.monotonic()
        # One reference swap: readers see this snapshot whole, or the last.
        self._stats = Stats(
            running=running, waiting=len(self._waiting), max_running=self._max_running,
            prompt_cache_entries=len(cache), prompt_cache_bytes=cache.nbytes,
            prompt_cache_max_bytes=cache.max_bytes,
            kv_bytes_per_token=self._kv_per_token, kv_reserved_bytes=self._kv_in_use(),
            kv_budget_bytes=self._kv_budget or 0,
            # MLX's allocator: the model, the caches and work buffers.
            memory_active_bytes=mx.get_active_memory(),
            memory_peak_bytes=mx.get_peak_memory(),
            memory_buffer_cache_bytes=mx.get_cache_memory())

    # Admission.

    def _take_inbox(self, block):
        """Take in the requests the prompt thread prepared: each is Accepted
        and waits in line as a Slot."""
        while True:
            try:
                ready = self._inbox.get(block=block, timeout=IDLE_POLL_S if block else None)
            except thread_queue.Empty:
                return
            if ready is None or self._stopping:
                return
            block = False
            self._prompts.taken(len(ready))
            for prepared in ready:
                self._accept(prepared)

    def _accept(self, prepared):
        job = prepared.job
        if job.cancelled:
            log.info("job %d cancelled while waiting", job.id)
            return
        job.deliver(prepared.accepted)
        try:
            slot = self.slot_type(job, prepared.prompt, prepared.max_tokens,
                                  prepared.parser, prepared.constraint, self._style,
                                  kv_bytes=prepared.kv_bytes)
        except Exception as e:  # a bug must fail this request, not the thread
            log.exception("job %d: its slot could not be made", job.id)
            job.deliver(Failed("internal", f"generation failed: {e}"))
            return
        self._waiting.append(slot)

    # The scheduler.

    def _drop_cancelled(self):
        """Forget cancelled requests: those waiting never reach the model;
        those running leave it, their KV cache kept for reuse."""
        if any(slot.job.cancelled for slot in self._waiting):
            for slot in self._waiting:
                if slot.job.cancelled:
                    log.info("job %d cancelled while waiting", slot.job.id)
            self._waiting = deque(s for s in self._waiting if not s.job.cancelled)
        for slot in [s for s in self._runners.slots()
                     if s.job.cancelled or self._stopping]:
            _log_cancelled(slot)
            self._prompt_cache.store(slot, *self._runners.remove(slot))

    def _schedule(self):
        """Decide who runs: a request alone runs solo; more than one share the
        batch, which takes waiting requests, in order, while it has room and
        their KV cache fits beside the running ones'. A prompt longer than a
        chunk is read solo, apart from the batch, when that place is free
        (fair prefill: see PREFILL_YIELD_STEPS); it joins the batch once read."""
        runners = self._runners
        runners.regroup(company=self._head_fits())
        while self._waiting and self._head_fits():
            head = self._waiting[0]
            alone = len(self._waiting) == 1 and not runners.running
            if (alone or head.unread > self._prefill_chunk) and runners.solo_has_room():
                self._start(self._waiting.popleft(), alone=True)
            elif runners.has_room():
                self._start(self._waiting.popleft(), alone=False)
            else:
                break

    def _start(self, slot, alone):
        try:
            self._runners.add(slot, self._prompt_cache.start(slot), alone)
        except Exception as e:
            self._runners.fail(slot, e)

    def _kv_in_use(self):
        """The KV the running requests reserve."""
        return sum(slot.kv_bytes for slot in self._runners.slots())

    def _head_fits(self):
        """Whether the first waiting request's KV fits beside the running ones'
        (with nothing running it always does: the budget holds a full window)."""
        if not self._waiting:
            return False
        head = self._waiting[0]
        used = self._kv_in_use()
        if not used or used + head.kv_bytes <= (self._kv_budget or 0):
            return True
        if not head.waited:
            head.waited = True
            log.info("job %d waits for KV memory: it needs %.0f MiB, %.0f of %.0f MiB "
                     "are held", head.job.id, head.kv_bytes / 2**20, used / 2**20,
                     (self._kv_budget or 0) / 2**20)
        return False

    def _ended(self, slot, reason, cache, tokens):
        """A request ended and left its runner: keep its cache, then tell its
        owner (after the stats say it left: a client that reads Finished and
        then the stats sees the engine without it)."""
        stored = self._prompt_cache.store(slot, cache, tokens)
        self._publish()
        slot.finish(*reason, stored)


class PromptCache:
    """KV caches of finished (and cancelled) requests, looked up by longest
    common prefix: mlx-lm's LRUPromptCache, bounded by entries and bytes."""

    def __init__(self, loaded, max_bytes):
        from mlx_lm.models.cache import LRUPromptCache

        self._model = loaded.model
        self._lru = LRUPromptCache(max_size=PROMPT_CACHE_ENTRIES, max_bytes=max_bytes)
        self.stored = 0  # caches stored so far: what changes the entries and bytes

    def __len__(self):
        return len(self._lru)

    @property
    def nbytes(self):
        return self._lru.nbytes

    @property
    def max_bytes(self):
        return self._lru.max_bytes

    def start(self, slot):
        """The State a request starts from: a KV cache holding the longest
        stored prefix of its prompt, and the prompt tokens still to read (at
        least one: its logits are needed). Sets ``slot.cached``."""
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        prompt = slot.prompt
        started = time.perf_counter()
        cache, rest = self._lru.fetch_nearest_cache(PROMPT_CACHE_KEY, prompt)
        if cache is None:
            cache, rest = make_prompt_cache(self._model), prompt
        elif not rest:  # the whole prompt was stored: recompute its last token
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        slot.cached = len(prompt) - len(rest)
        log.debug("job %d: %d of %d prompt tokens from the prompt cache (%.1f ms)",
                  slot.job.id, slot.cached, len(prompt),
                  (time.perf_counter() - started) * 1000)
        return State(cache, prompt[:slot.cached], list(rest))

    def store(self, slot, cache, tokens):
        """Keep a KV cache: a prefix of the request's prompt and answer serves
        the next request that starts the same way (the next turn of a chat),
        also after a cancellation. Returns whether it was kept."""
        if not cache:
            return False
        held = cache[0].offset
        if not held or len(tokens) < held:
            return False
        import mlx.core as mx

        # Computed now: a cache cut out of the batch is a lazy slice of the
        # batch's buffers and would keep all of them alive, unaccounted for
        # by the cache's byte bound, until first used.
        mx.eval([c.state for c in cache])
        # Prompts the client marked for caching are evicted last.
        kind = "user" if slot.job.request.cache_hint else "assistant"
        self._lru.insert_cache(PROMPT_CACHE_KEY, list(tokens[:held]), cache,
                               cache_type=kind)
        self.stored += 1
        return True
