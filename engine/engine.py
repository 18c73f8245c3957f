"""The engine thread: the one place where MLX runs.

Owns: loading the model, rendering prompts with the tokenizer's chat
template, prefill in chunks, decoding, stop sequences, and handing results
to the asyncio side through each request's ``asyncio.Queue``.

Never: touches sockets or awaits anything. It crosses to the event loop only
through ``loop.call_soon_threadsafe(queue.put_nowait, msg)`` with the frozen
message types below.

Requests decode together in one batch (mlx-lm's ``BatchGenerator``): each
joins between two decode steps once its prompt has been read, and leaves
when it finishes, is cancelled or fails, with its own sampler, stop sequences
and ``max_tokens``. A request alone runs "solo" on a plain KV cache instead:
a batch of one pays the batch's bookkeeping on every token (measured on an
H100: half the decode rate), and one request at a time is the common case of
a single user. It joins the batch when another arrives, and the last request
left in a batch goes solo again. Prompts are read a slice per step, so a
long prompt slows the others' decoding but does not stop it. Finished requests leave
their KV cache in an LRU store bounded in bytes; a new request starts from
the longest stored prefix of its tokens. More requests than the batch holds
wait in line, visible through ``Engine.stats``.
"""

import ctypes
import functools
import itertools
import logging
import queue as thread_queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from . import grammar as grammars
from .models import DEFAULT_ROPE_SCALING, ModelError, load, physical_memory
from .progress import step
from .text import (ClearThinking, ClearToolUses, PromptEncoder, RenderError, StopMatcher,
                   clear_thinking, clear_tool_uses, render_prompt, template_takes_tools,
                   tool_uses)
from .tools import (FALLBACK_FORMAT, JSON_TOOLS_FORMAT, CallFormat, OutputParser,
                    TextDelta, ThinkingDelta, ToolCallEnd, ToolCallStart,
                    ToolInputDelta, grammar)

log = logging.getLogger("pensieve.engine")

# Prompt tokens read per engine step, shared among the prompts being read
# while others decode (each prompt gets a whole chunk when none do). Between
# steps the engine takes new requests and notices cancellations, and the
# running requests decode one token, so this bounds how long any of them
# waits behind a long prompt.
PREFILL_CHUNK_CPU = 256
PREFILL_CHUNK_GPU = 2048
# The smallest slice of a prompt read in one step when many share the chunk.
PREFILL_MIN_SLICE = 16
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


# --- Requests and the messages sent back --------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, already validated by the HTTP side."""

    messages: tuple  # Messages (engine.text), or (role, text) pairs
    max_tokens: int
    # Anthropic tool definitions (name, description, input_schema) the prompt
    # lists at its start.
    tools: tuple = ()
    # The tools the answer may call, where they differ from ``tools``: tool
    # search and tool changes load (and withdraw) tools along the
    # conversation, their definitions rendered there. None: ``tools``.
    callable_tools: tuple | None = None
    # auto | any | none | the name of the one tool to call
    tool_choice: str = "auto"
    parallel_calls: bool = True
    answer_schema: dict | None = None  # a JSON schema the text answer follows
    thinking: bool | None = None  # ask the template to think or not; None: its default
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: tuple = ()
    # The client marked parts of the prompt with cache_control: the prompt
    # tokens this request reads are reported as cache creation, not input.
    cache_hint: bool = False
    # ClearThinking / ClearToolUses (engine.text), applied in order before
    # the prompt is tokenized (the API's context_management.edits).
    context_edits: tuple = ()

    @property
    def offered(self):
        """The tools the answer may call (and the grammar allows)."""
        return self.tools if self.callable_tools is None else self.callable_tools


@dataclass(frozen=True)
class CountRequest:
    """Only count the tokens ``messages`` and ``tools`` would take as a prompt."""

    messages: tuple
    tools: tuple = ()
    context_edits: tuple = ()


@dataclass(frozen=True)
class Counted:
    input_tokens: int


@dataclass(frozen=True)
class Accepted:
    """The prompt fits: its token count and the output budget after clamping.
    ``constrained``: the answer is decoded under a grammar."""

    input_tokens: int
    max_tokens: int
    constrained: bool = False
    # The context edits that changed the prompt, as the API reports them
    # (context_management.applied_edits): dicts.
    applied_edits: tuple = ()


@dataclass(frozen=True)
class Finished:
    stop_reason: str  # end_turn | max_tokens | stop_sequence | tool_use
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int
    time_to_first_token: float
    decode_tps: float
    cached_tokens: int = 0  # of input_tokens, taken from the prompt cache
    # Of input_tokens, read here and stored in the prompt cache as the client
    # asked (cache_control); the rest of those read are plain input.
    cache_created_tokens: int = 0


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
        # between steps (one decode step and at most one prefill chunk).
        self.cancelled = True


# --- The engine ---------------------------------------------------------------


class _Slot:
    """A request the engine has accepted, from the line to the batch."""

    def __init__(self, job, prompt, max_tokens, detokenizer, parser, constraint,
                 kv_bytes=0):
        self.job = job
        self.kv_bytes = kv_bytes  # the KV cache its prompt and answer can fill
        self.waited = False  # logged once as waiting for KV memory
        self.parser = parser  # generated text -> text, thinking and call events
        self.constraint = constraint  # grammar.Constraint, or None
        self.prompt = prompt  # token ids
        self.max_tokens = max_tokens
        self.accepted_at = time.perf_counter()
        self.cached = 0  # prompt tokens taken from the prompt cache
        self.unread = 0  # prompt tokens still to read before decoding starts
        self.detokenizer = detokenizer
        self.stops = StopMatcher(job.request.stop_sequences)
        self.output_tokens = 0
        self.first_token_at = None


class _Solo:
    """The model state of a request running alone: its KV cache, the tokens
    in it, the prompt tokens not yet read, ``next_input``: a token delivered
    but not yet fed to the model, and ``steps``: mlx-lm's generate_step once
    decoding (every token it has yielded is in the cache)."""

    def __init__(self, slot, cache, tokens, unread, next_input=None):
        self.slot = slot
        self.cache = cache
        self.tokens = tokens
        self.unread = unread
        self.next_input = next_input
        self.steps = None

    def close(self):
        if self.steps is not None:
            self.steps.close()
            self.steps = None


def _trim_heap():
    """Hand the C heap's free pages back to the OS. glibc keeps them: after
    freeing a large block it raises its mmap threshold (to 32 MiB), so later
    work buffers come from the heap and stay in the RSS once freed."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc only
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _log_cancelled(slot):
    log.info("job %d cancelled after %d of %d prompt tokens, %d output tokens",
             slot.job.id, len(slot.prompt) - slot.unread, len(slot.prompt),
             slot.output_tokens)


@functools.lru_cache(maxsize=64)
def _sampler(temperature, top_p, top_k):
    """One sampler per setting, shared: a batch whose requests share a sampler
    samples in one call instead of one per request."""
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p, top_k=top_k)


class Engine:
    """Runs all model work on one dedicated thread.

    ``start()`` launches the thread, which loads the model; ``submit()`` queues
    a request and returns its Job; ``stop()`` ends the thread.
    """

    def __init__(self, model_spec=None, cpu_weights="float32", cache_bytes=None,
                 max_running=DEFAULT_MAX_RUNNING, prefill_chunk=None, constrain=True,
                 context_window=None, rope_scaling=DEFAULT_ROPE_SCALING, kv_bytes=None):
        self._spec = model_spec
        self._window = context_window  # None: the model's (see models.load)
        self._rope_scaling = rope_scaling
        self._kv_budget = kv_bytes  # None: KV_MEMORY_SHARE of the memory, once loaded
        self._kv_per_token = 0
        # Grammar-constrained tool calls and JSON answers, when llguidance is
        # installed; ``self.constrained`` says whether they are on once loaded.
        self._constrain = constrain
        self.constrained = False
        self._grammars = None
        self._prefill_chunk = prefill_chunk  # None: by device, once loaded
        self._cpu_weights = cpu_weights
        self._cache_bytes = cache_bytes
        self._max_running = max_running
        self._inbox = thread_queue.SimpleQueue()
        self._waiting = deque()  # _Slots accepted, not yet in the batch
        self._running = {}  # the batch: generator uid -> _Slot
        self._solo = None  # or the _Solo running alone, outside the batch
        self._generator = None
        self._thread = None
        self._stopping = False
        self._loaded = threading.Event()
        self._prompt_cache = None  # made on the engine thread once loaded
        self.model = None
        self.load_error = None

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
        stats = {"running": len(self._running) + (self._solo is not None),
                 "waiting": len(self._waiting) + self._inbox.qsize(),
                 "max_running": self._max_running,
                 "prompt_cache_entries": len(cache) if cache is not None else 0,
                 "prompt_cache_bytes": cache.nbytes if cache is not None else 0,
                 "prompt_cache_max_bytes": cache.max_bytes if cache is not None else 0,
                 "kv_bytes_per_token": self._kv_per_token,
                 "kv_reserved_bytes": self._kv_in_use(),
                 "kv_budget_bytes": self._kv_budget or 0}
        if self.model is not None:  # MLX is imported once the model is loaded
            import mlx.core as mx

            # MLX's allocator: the model, the caches and work buffers.
            stats["memory_active_bytes"] = mx.get_active_memory()
            stats["memory_peak_bytes"] = mx.get_peak_memory()
            stats["memory_buffer_cache_bytes"] = mx.get_cache_memory()
        return stats

    # The thread.

    def _run(self):
        try:
            self.model = load(self._spec, cpu_weights=self._cpu_weights,
                              context_window=self._window,
                              rope_scaling=self._rope_scaling)
        except ModelError as e:
            self.load_error = e
        except Exception as e:  # a bug or an MLX failure: report, do not hang
            log.exception("model load failed")
            self.load_error = ModelError(f"model load failed: {e}")
        if self.load_error is None:
            try:
                self._prepare()
            except ModelError as e:
                self.load_error = e
            except Exception as e:
                log.exception("engine set-up failed")
                self.load_error = ModelError(f"engine set-up failed: {e}")
        self._loaded.set()
        if self.load_error is not None:
            return
        import mlx.core as mx

        # This thread's default stream, as mlx-lm's own server uses: mlx-lm's
        # module-level thread-local stream, used from a non-main thread,
        # aborts the process at interpreter exit ("terminate called without
        # an active exception"), and so does a stream from mx.new_stream.
        self._stream = mx.default_stream(mx.default_device())
        self._generator = self._new_generator()
        worked = False
        try:
            while not self._stopping:
                idle = not (self._waiting or self._running or self._solo)
                if idle and worked:
                    # MLX keeps freed work buffers (a batch's prefill logits
                    # run to hundreds of MB) for reuse; with nothing to do,
                    # give them back, so an idle server's memory is the model
                    # and the prompt cache.
                    mx.clear_cache()
                    _trim_heap()
                    worked = False
                self._take_inbox(block=idle)
                self._drop_cancelled()
                self._schedule()
                if not self._stopping:
                    worked = worked or bool(self._running or self._solo)
                    self._advance()
        finally:
            self._generator.close()

    def _prepare(self):
        """Everything that depends on the loaded model, before serving."""
        if self._prefill_chunk is None:
            self._prefill_chunk = (PREFILL_CHUNK_CPU if self.model.device == "cpu"
                                   else PREFILL_CHUNK_GPU)
        self._vocab_size = len(self.model.tokenizer.vocab)  # ~20 ms: once
        self._setup_output()
        self._encode = PromptEncoder(self.model.tokenizer)
        if not self._encode.usable:
            log.info("this tokenizer is not encoded piece by piece: each prompt is "
                     "tokenized whole")
            self._encode = None
        from mlx_lm.models.cache import LRUPromptCache

        self._prompt_cache = LRUPromptCache(
            max_size=PROMPT_CACHE_ENTRIES,
            max_bytes=self._cache_bytes if self._cache_bytes is not None
            else int(min(PROMPT_CACHE_MEMORY_SHARE * physical_memory(), 1 << 62)))
        self._warm_up()
        self._size_kv()

    def _warm_up(self):
        """One forward pass before serving: a GPU compiles its kernels on first
        use (seconds on CUDA), which would otherwise land on the first request.
        Measures the KV cache a token takes."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        try:
            with step("warming up"):
                tokens = self.model.tokenizer.encode("Hello") or [0]
                cache = make_prompt_cache(self.model.model)
                mx.eval(self.model.model(mx.array([tokens]), cache=cache))
                # Caches allocate in steps: bytes over the positions allocated.
                self._kv_per_token = sum(c.nbytes // c.keys.shape[-2] for c in cache
                                         if getattr(c, "keys", None) is not None)
        except Exception as e:  # a model that needs more than tokens: serve anyway
            log.warning("warm-up skipped (%s): the first request pays for it", e)
        mx.clear_cache()

    def _size_kv(self):
        """The KV budget of running requests; it must hold one full window."""
        import mlx.core as mx

        if self._kv_budget is None:
            memory = mx.device_info().get("memory_size") or physical_memory()
            self._kv_budget = int(min(KV_MEMORY_SHARE * memory, 1 << 62))
        full = self._kv_per_token * self.model.context_window
        if full > self._kv_budget:
            raise ModelError(
                f"one {self.model.context_window}-token request needs {full / 2**30:.1f} "
                f"GiB of KV cache, more than the {self._kv_budget / 2**30:.1f} GiB kept "
                "for it; serve a smaller --context-window or raise --kv-memory-mb")
        log.info("KV cache: %d bytes a token; %.1f GiB for running requests (%d full "
                 "windows)", self._kv_per_token, self._kv_budget / 2**30,
                 self._kv_budget // max(full, 1))

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator

        eos = [[t] for t in sorted(self.model.tokenizer.eos_token_ids)]
        # The batch is bounded here, by _schedule: the generator takes
        # everything it is given at once.
        return BatchGenerator(self.model.model, stop_tokens=eos,
                              completion_batch_size=self._max_running,
                              prefill_batch_size=self._max_running,
                              prefill_step_size=self._prefill_chunk,
                              stream=self._stream)

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
            if job.cancelled:
                log.info("job %d cancelled while waiting", job.id)
            else:
                self._admit(job)

    def _admit(self, job):
        started = time.perf_counter()
        request = job.request
        try:
            thinking = getattr(request, "thinking", None)
            if isinstance(request, GenerationRequest) and self._think:
                # A forced call starts at once (as the API refuses thinking
                # with it); a JSON answer thinks first only when asked to.
                if request.tool_choice not in ("auto", "none") or (
                        request.answer_schema is not None and not thinking):
                    thinking = False
            prompt, applied = self._render(request, thinking)
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
        try:
            parser, constraint = self._output(request, prompt, thinking)
        except grammars.GrammarError as e:
            job.deliver(Failed("invalid_request", f"cannot constrain the answer: {e}"))
            return
        except Exception as e:
            log.exception("grammar set-up failed (job %d)", job.id)
            job.deliver(Failed("internal", f"grammar set-up failed: {e}"))
            return
        job.deliver(Accepted(len(prompt), max_tokens, constraint is not None, applied))
        log.debug("job %d: %d prompt tokens, rendered, tokenized and constrained in "
                  "%.1f ms", job.id, len(prompt), (time.perf_counter() - started) * 1000)
        self._waiting.append(_Slot(job, prompt, max_tokens,
                                   self.model.tokenizer.detokenizer, parser, constraint,
                                   kv_bytes=(len(prompt) + max_tokens) * self._kv_per_token))

    def _render(self, request, thinking):
        """The prompt tokens after the request's context edits, and the edits
        that changed it (each with the tokens it freed)."""
        def render(messages):
            return render_prompt(self.model.tokenizer, messages, request.tools,
                                 self._encode, thinking)

        messages = request.messages
        prompt, applied = render(messages), []
        for edit in request.context_edits:
            if isinstance(edit, ClearThinking):
                edited, cleared = clear_thinking(messages, edit)
            elif (edit.trigger_tokens is not None and len(prompt) > edit.trigger_tokens) \
                    or (edit.trigger_uses is not None
                        and tool_uses(messages) > edit.trigger_uses):
                edited, cleared = clear_tool_uses(messages, edit)
            else:
                continue
            if not cleared:
                continue
            shorter = render(edited)
            freed = len(prompt) - len(shorter)
            if isinstance(edit, ClearToolUses) and freed < edit.clear_at_least:
                continue
            messages, prompt = edited, shorter
            if not getattr(edit, "implicit", False):
                what = ("cleared_thinking_turns" if isinstance(edit, ClearThinking)
                        else "cleared_tool_uses")
                applied.append({"type": edit.type, what: cleared,
                                "cleared_input_tokens": freed})
        return prompt, tuple(applied)

    # What comes out: the call format, thinking, and the grammar.

    def _setup_output(self):
        """Learn how this model writes calls and thinks; load the grammar engine."""
        tokenizer = self.model.tokenizer
        self._call_format = FALLBACK_FORMAT
        if template_takes_tools(tokenizer):
            start = getattr(tokenizer, "tool_call_start", None)
            parse = getattr(tokenizer, "tool_parser", None)
            module = getattr(parse, "__module__", "") or ""
            if start is None or module.endswith("json_tools"):
                self._call_format = JSON_TOOLS_FORMAT
            else:  # a format of its own: read by mlx-lm's parser, not constrained
                self._call_format = CallFormat(open=start, close=tokenizer.tool_call_end,
                                               parse=parse, name=module.rsplit(".", 1)[-1])
        self._think = None
        if getattr(tokenizer, "has_thinking", False):
            self._think = (tokenizer.think_start, tokenizer.think_end)
            self._think_end_tokens = tuple(tokenizer.think_end_tokens)
        self._grammars = None
        if not self._constrain:
            log.info("constrained decoding is off (--grammar off): tool calls and "
                     "JSON answers are parsed, not guaranteed")
        elif not grammars.available():
            log.warning("llguidance is not installed: tool calls and JSON answers are "
                        "not constrained (pip install llguidance)")
        else:
            try:
                self._grammars = grammars.Grammars(tokenizer, self._vocab_size)
            except Exception as e:
                log.warning("constrained decoding unavailable for this tokenizer: %s", e)
        self.constrained = self._grammars is not None
        log.info("tool calls: %s format, %s", self._call_format.name,
                 "constrained by grammar" if self.constrained else "unconstrained")

    def _output(self, request, prompt, thinking):
        """The parser of this request's output and its grammar constraint (or None)."""
        may_think = self._think is not None and thinking is not False
        in_thinking = False
        if may_think:
            tail = self.model.tokenizer.decode(prompt[-4:])
            in_thinking = tail.rstrip().endswith(self._think[0])
        names = [t["name"] for t in request.offered]
        constraint = None
        if self._grammars is not None:
            text = grammar(self._call_format,
                           [(t["name"], t.get("input_schema")) for t in request.offered],
                           request.tool_choice, request.answer_schema,
                           request.parallel_calls, lead_space=may_think)
            if text is not None:
                # A thinking block comes first, unconstrained.
                constraint = grammars.Constraint(
                    self._grammars.matcher(text), self._vocab_size,
                    arm_after=self._think_end_tokens if may_think else None)
        specs = [{"type": "function", "function": {
            "name": t["name"], "parameters": t.get("input_schema", {})}}
            for t in request.offered]
        parser = OutputParser(self._call_format, names, thinking=self._think,
                              in_thinking=in_thinking,
                              stream_arguments=constraint is not None,
                              calls=request.tool_choice != "none", tool_specs=specs)
        return parser, constraint

    def _drop_cancelled(self):
        """Forget cancelled requests: those waiting never reach the model;
        those in the batch leave it, their KV cache kept for reuse."""
        if any(slot.job.cancelled for slot in self._waiting):
            for slot in self._waiting:
                if slot.job.cancelled:
                    log.info("job %d cancelled while waiting", slot.job.id)
            self._waiting = deque(s for s in self._waiting if not s.job.cancelled)
        solo = self._solo
        if solo is not None and (solo.slot.job.cancelled or self._stopping):
            _log_cancelled(solo.slot)
            self._solo = None
            solo.close()
            self._store(solo.slot, solo.cache, solo.tokens)
        gone = [uid for uid, slot in self._running.items()
                if slot.job.cancelled or self._stopping]
        for uid in gone:
            _log_cancelled(self._running[uid])
            self._leave(uid)

    def _advance(self):
        """One step of work: for the solo request, or for the batch."""
        if self._solo is not None:
            self._solo_step()
        elif self._running:
            self._step()

    def _schedule(self):
        """Decide who runs: a request alone runs solo; more than one share the
        batch, which takes waiting requests, in order, while it has room and
        their KV cache fits beside the running ones'."""
        company = self._head_fits()
        if self._solo is not None and company and self._max_running > 1:
            self._guarded(self._solo.slot, self._to_batch)  # company has come
        elif self._solo is None and len(self._running) == 1 and not company:
            (slot,) = self._running.values()
            self._guarded(slot, self._to_solo)  # the last one left in the batch
        if self._solo is None and not self._running and len(self._waiting) == 1:
            slot = self._waiting.popleft()
            self._guarded(slot, self._start_solo, slot)
        while (self._solo is None and len(self._running) < self._max_running
               and self._head_fits()):
            slot = self._waiting.popleft()
            self._guarded(slot, self._start_batched, slot)

    def _kv_in_use(self):
        """The KV the running requests reserve (also read by stats() from
        other threads: one read of each field)."""
        solo = self._solo
        slots = [*self._running.values(), *([solo.slot] if solo is not None else [])]
        return sum(slot.kv_bytes for slot in slots)

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

    def _guarded(self, slot, action, *args):
        """Run ``action``; if it fails, that request alone fails."""
        try:
            action(*args)
        except Exception as e:
            self._fail(slot, e)

    def _fail(self, slot, error):
        log.exception("job %d failed", slot.job.id, exc_info=error)
        slot.job.deliver(Failed("internal", f"generation failed: {error}"))
        if self._solo is not None and self._solo.slot is slot:
            self._solo.close()
            self._solo = None
        for uid in [uid for uid, s in self._running.items() if s is slot]:
            self._leave(uid, keep_cache=False)

    def _start_solo(self, slot):
        cache, rest = self._cached_prefix(slot)
        self._solo = _Solo(slot, cache, slot.prompt[:slot.cached], rest)

    def _start_batched(self, slot):
        cache, rest = self._cached_prefix(slot)
        self._insert(slot, rest, cache, slot.prompt[:slot.cached], slot.max_tokens)

    def _sampler(self, slot):
        req = slot.job.request
        # top_k beyond the vocabulary means "no limit" (argpartition would fail).
        top_k = req.top_k if req.top_k and req.top_k < self._vocab_size else 0
        sampler = _sampler(req.temperature, req.top_p or 0.0, top_k)
        if slot.constraint is not None:
            return slot.constraint.sampler(sampler)
        return sampler

    def _insert(self, slot, prompt, cache, tokens, max_tokens):
        """Add ``slot`` to the batch: ``prompt`` still to read after the
        ``tokens`` its ``cache`` holds, at most ``max_tokens`` more to make."""
        processors = [slot.constraint] if slot.constraint is not None else []
        (uid,) = self._generator.insert(
            [prompt], max_tokens=[max_tokens], caches=[cache], all_tokens=[tokens],
            samplers=[self._sampler(slot)], logits_processors=[processors])
        slot.unread = len(prompt) - 1
        self._running[uid] = slot

    def _to_batch(self):
        """Move the solo request into the batch, where others can join it."""
        from mlx_lm.models.cache import trim_prompt_cache

        solo, self._solo = self._solo, None
        slot = solo.slot
        if solo.steps is not None:
            # generate_step has fed the last token it yielded and is computing
            # the next, which cannot be taken out of it: drop that token from
            # the cache, and the batch feeds it again.
            solo.close()
            trim_prompt_cache(solo.cache, 1)
            solo.next_input = solo.tokens.pop()
            if slot.constraint is not None:  # it has seen that token: it sees it again
                slot.constraint.unfeed(slot.constraint.seen - (slot.output_tokens - 1))
        if solo.next_input is None:  # still reading its prompt
            self._insert(slot, solo.unread, solo.cache, solo.tokens, slot.max_tokens)
        else:  # the batch starts by feeding the token delivered last
            self._insert(slot, [solo.next_input], solo.cache, solo.tokens,
                         slot.max_tokens - slot.output_tokens)

    def _to_solo(self):
        """Take the batch's last request out to run solo (decoding only; one
        still reading its prompt stays). Uses two internals of mlx-lm's
        BatchGenerator (its generation batch and that batch's next tokens);
        if they are not there, the request simply stays in the batch."""
        (uid,) = self._running
        batch = getattr(self._generator, "_generation_batch", None)
        pending = getattr(batch, "_next_tokens", None)
        if batch is None or pending is None or list(batch.uids) != [uid]:
            return
        token = int(pending[0].item())  # sampled, not yet fed nor delivered
        if self._running[uid].constraint is not None:
            self._running[uid].constraint.unfeed(0)  # the next one reads it anew
        cache, tokens = self._generator.remove([uid], return_prompt_caches=True)[uid]
        slot = self._running.pop(uid)
        self._solo = _Solo(slot, cache, list(tokens), [], token)
        self._solo_emit(self._solo, token)

    def _cached_prefix(self, slot):
        """A KV cache holding the longest stored prefix of the slot's prompt,
        and the prompt tokens still to read (at least one: its logits are
        needed). Sets ``slot.cached`` and ``slot.unread``."""
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        prompt = slot.prompt
        started = time.perf_counter()
        cache, rest = self._prompt_cache.fetch_nearest_cache(PROMPT_CACHE_KEY, prompt)
        if cache is None:
            cache, rest = make_prompt_cache(self.model.model), prompt
        elif not rest:  # the whole prompt was stored: recompute its last token
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        slot.cached = len(prompt) - len(rest)
        slot.unread = len(rest) - 1
        log.debug("job %d: %d of %d prompt tokens from the prompt cache (%.1f ms)",
                  slot.job.id, slot.cached, len(prompt),
                  (time.perf_counter() - started) * 1000)
        return cache, list(rest)

    # A request running alone.

    def _solo_step(self):
        """One prefill chunk or one decode step of the solo request."""
        solo = self._solo
        reading = solo.next_input is None and solo.steps is None
        self._guarded(solo.slot, self._solo_read if reading else self._solo_decode,
                      solo)

    def _solo_read(self, solo):
        """Read a chunk of the prompt; after its last token, the first token
        of the answer is computed and delivered on its own, so it reaches the
        client before the second starts computing (on a CPU that work takes
        every core, and the event loop would otherwise wait for one)."""
        import mlx.core as mx

        model, cache = self.model.model, solo.cache
        with mx.stream(self._stream):
            if len(solo.unread) > 1:
                n = min(self._prefill_chunk, len(solo.unread) - 1)
                chunk, solo.unread = solo.unread[:n], solo.unread[n:]
                model(mx.array(chunk)[None], cache=cache)
                mx.eval([c.state for c in cache])
                solo.tokens += chunk
                solo.slot.unread = len(solo.unread) - 1
                return
            logits = model(mx.array(solo.unread)[None], cache=cache)[:, -1, :]
            if solo.slot.constraint is not None:
                logits = solo.slot.constraint(None, logits)
            solo.tokens += solo.unread
            solo.unread = []
            solo.slot.unread = 0
            token = int(self._sampler(solo.slot)(
                logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item())
        solo.next_input = token
        self._solo_emit(solo, token)

    def _solo_decode(self, solo):
        """The next token from mlx-lm's generate_step, which pipelines each
        step's model call with the last one's readback; it starts from the
        token delivered last."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        if solo.steps is None:
            solo.steps = generate_step(
                mx.array([solo.next_input]), self.model.model, stream=self._stream,
                prompt_cache=solo.cache, sampler=self._sampler(solo.slot),
                logits_processors=([solo.slot.constraint]
                                   if solo.slot.constraint is not None else None),
                max_tokens=solo.slot.max_tokens - solo.slot.output_tokens)
            solo.tokens.append(solo.next_input)
            solo.next_input = None
        token = next(solo.steps, None)
        if token is None:  # its max_tokens: ours says the same, but to be sure
            return self._solo_end(solo, self._flush(solo.slot, "max_tokens"))
        token = int(token[0])
        solo.tokens.append(token)
        self._solo_emit(solo, token)

    def _solo_emit(self, solo, token):
        """Deliver ``token`` of the solo request; returns True if it ended the
        request (its cache then goes to the prompt cache)."""
        reason = self._deliver_token(solo.slot, token)
        if reason is None:
            return False
        self._solo_end(solo, reason)
        return True

    def _solo_end(self, solo, reason):
        self._solo = None
        solo.close()
        stored = self._store(solo.slot, solo.cache, solo.tokens)
        self._finished(solo.slot, *reason, stored)

    def _step(self):
        """One decode step for the batch and one prefill chunk for the prompts
        being read, then each request's new token to its owner."""
        reading = sum(1 for slot in self._running.values() if slot.unread > 0)
        if reading < len(self._running):
            # Others are decoding: the prompts being read share one chunk, so
            # each step keeps the others' next token as near as one chunk.
            self._generator.prefill_step_size = max(
                self._prefill_chunk // max(reading, 1), PREFILL_MIN_SLICE)
        else:  # nobody waits on a token: each prompt gets a whole chunk
            self._generator.prefill_step_size = self._prefill_chunk
        try:
            progress, generated = self._generator.next()
        except Exception as e:
            # The batch's state is unknown: fail the requests in it and start
            # a new one. Those waiting, and later ones, are served as usual.
            log.exception("batch step failed; failing its %d requests",
                          len(self._running))
            for slot in self._running.values():
                slot.job.deliver(Failed("internal", f"generation failed: {e}"))
            self._running.clear()
            self._generator.close()
            self._generator = self._new_generator()
            return
        for r in progress:
            slot = self._running.get(r.uid)
            if slot is not None:
                done, total = r.progress
                slot.unread = max(total - done - 1, 0)
        for r in generated:
            slot = self._running.get(r.uid)
            if slot is None:
                continue
            # Our own per-request work (detokenizing, stop sequences,
            # delivery) failing ends that request alone.
            self._guarded(slot, self._emit, r.uid, slot, r)

    def _emit(self, uid, slot, r):
        """Handle one generated token of ``slot`` in the batch."""
        reason = self._deliver_token(slot, r.token)
        if reason is None and r.finish_reason:  # the generator's count ran out
            reason = self._flush(slot, "max_tokens")
        if reason is None:
            return
        # The generator has already dropped a request it finished itself.
        stored = self._leave(uid, r if r.finish_reason else None)
        self._finished(slot, *reason, stored)

    def _deliver_token(self, slot, token):
        """Count and deliver one generated token (its text, if any). Returns
        (stop_reason, stop_sequence) if it ends the request, else None."""
        slot.output_tokens += 1
        if slot.first_token_at is None:
            slot.first_token_at = time.perf_counter()
        if token in self.model.tokenizer.eos_token_ids:  # the end: not text
            return self._flush(slot, "end_turn")
        detokenizer = slot.detokenizer
        detokenizer.add_token(token)
        if slot.job.request.stop_sequences:
            text, matched = slot.stops.feed(detokenizer.last_segment)
        else:  # the common case: nothing to hold back
            text, matched = detokenizer.last_segment, None
        if text:
            self._deliver_text(slot, text)
        if matched is not None:
            return self._flush(slot, "stop_sequence", matched)
        if slot.output_tokens >= slot.max_tokens:
            return self._flush(slot, "max_tokens")
        return None

    def _deliver_text(self, slot, text):
        """Text goes through the request's output parser, which sends text,
        thinking and tool calls as they are recognised."""
        for event in slot.parser.feed(text):
            slot.job.deliver(event)

    def _flush(self, slot, stop_reason, matched=None):
        """Deliver the detokenizer's, the stop matcher's and the parser's
        held-back text (a stop sequence may still complete in the
        detokenizer's last piece). Returns (stop_reason, stop_sequence)."""
        if matched is None:
            slot.detokenizer.finalize()
            text, matched = slot.stops.feed(slot.detokenizer.last_segment)
            if matched is None:
                text += slot.stops.flush()
            if text:
                self._deliver_text(slot, text)
        parser = slot.parser
        cut_off = parser.in_call
        for event in parser.finish():
            slot.job.deliver(event)
        if matched is not None:
            return "stop_sequence", matched
        if stop_reason == "end_turn" and parser.calls and not cut_off:
            return "tool_use", None
        return stop_reason, None

    def _finished(self, slot, stop_reason, stop_sequence, stored):
        now = time.perf_counter()
        decode_s = now - slot.first_token_at
        read = len(slot.prompt) - slot.cached
        slot.job.deliver(Finished(
            stop_reason, stop_sequence, len(slot.prompt), slot.output_tokens,
            time_to_first_token=slot.first_token_at - slot.accepted_at,
            decode_tps=(slot.output_tokens - 1) / decode_s if decode_s > 0 else 0.0,
            cached_tokens=slot.cached,
            cache_created_tokens=read if stored and slot.job.request.cache_hint else 0))

    def _leave(self, uid, finished=None, keep_cache=True):
        """Take ``uid`` out of the batch (the generator already has when it
        ``finished`` it) and keep its KV cache. Returns whether it was kept."""
        slot = self._running.pop(uid)
        if finished is not None:
            cache, tokens = finished.prompt_cache, finished.all_tokens
        else:
            cache, tokens = self._generator.remove(
                [uid], return_prompt_caches=keep_cache).get(uid, (None, None))
        if not keep_cache:
            return False
        return self._store(slot, cache, tokens)

    def _store(self, slot, cache, tokens):
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
        self._prompt_cache.insert_cache(PROMPT_CACHE_KEY, list(tokens[:held]), cache,
                                        cache_type=kind)
        return True
