"""The prompt threads: a request's work before the model, off the engine thread.

Owns: ``Admission`` (a request's prompt rendered after its context edits
and tokenized, the window check, its output parser and grammar: what a
request needs before the model; a count's whole answer) and ``Prompts``,
the two threads that run it: one for generation requests, in order, which
hands each prepared request (``Prepared``) to the engine thread; one for
counts, answered there, which never reach the engine.

Never: imports MLX or touches the model (the engine thread makes the Slot
and runs it), or sends anything but the frozen types of engine/messages.py
through a job's ``deliver``. Why a thread of its own: tokenizing is not MLX
work, and a prompt of 30 MB takes ~25 s to tokenize on this CPU; on the
engine thread that stopped every running request's decoding for as long
(bench/bench_count_stall.py). The tokenizer lets go of the GIL while it
works (PromptEncoder encodes long text in slices), so decoding goes on.
Counts have their own thread so that a long count never delays the
admission of a generation request.
"""

import logging
import queue as thread_queue
import threading
import time
from dataclasses import dataclass

from .grammar import GrammarError
from .messages import (Accepted, ClearThinking, ClearToolUses, CountRequest, Counted,
                       Failed)
from .models import trim_heap
from .text import (Cancelled, PromptEncoder, RenderError, as_message, clear_thinking,
                   clear_tool_uses, render_prompt, tool_uses)

log = logging.getLogger("pensieve.engine")

# A prompt of more tokens than this (~1 MB of text) leaves enough freed heap
# behind to hand back to the OS at once (a 30 MB count: ~120 MB of the RSS).
TRIM_AFTER_TOKENS = 1 << 18
# Generation requests prepared in a row are handed to the engine together
# (as it took in everything submitted between two steps when it prepared
# them itself), up to this many, so a steady stream still reaches it.
HAND_OVER_MAX = 32


@dataclass(frozen=True)
class Prepared:
    """A generation request ready for the model: what its Slot is made of.
    Crosses from the generation prompt thread to the engine thread only."""

    job: object
    accepted: Accepted  # delivered by the engine thread as it takes the job in
    prompt: list
    max_tokens: int
    parser: object
    constraint: object
    kv_bytes: int


def _release(tokens, step=65536):
    """Empty a token list from its end a slice at a time (freeing the 7M ints
    of a 30 MB prompt at once is one C call of ~100 ms that holds the GIL),
    and, after a large one, hand the freed memory back."""
    large = len(tokens) > TRIM_AFTER_TOKENS
    while len(tokens) > step:
        del tokens[-step:]
    if large:
        tokens.clear()
        trim_heap()


class Admission:
    """Turns a submitted job into Prepared work, or into its whole answer:
    its prompt rendered after its context edits, the window check, its
    output parser and grammar. What fails fails that request alone. One per
    thread (its PromptEncoder remembers that thread's pieces)."""

    def __init__(self, loaded, style, kv_per_token):
        self._tokenizer = loaded.tokenizer
        self._window = loaded.context_window
        self._style = style
        self._kv_per_token = kv_per_token
        self._encode = PromptEncoder(loaded.tokenizer)
        if not self._encode.usable:
            log.info("this tokenizer is not encoded piece by piece: each prompt is "
                     "tokenized whole")
        elif not self._encode.sliced:
            log.info("this tokenizer's long texts are not encoded in slices: a long "
                     "prompt is one call to the tokenizer")

    def __call__(self, job):
        """The job's Prepared work; None when it was answered (Counted, or
        Failed) or cancelled while it was being tokenized."""
        started = time.perf_counter()
        request = job.request
        self._encode.cancelled = lambda: job.cancelled
        try:
            thinking = self._style.thinking(request)
            prompt, applied = self._render(request, thinking)
        except Cancelled:  # only a long text is: hand its memory back
            log.info("job %d cancelled while its prompt was tokenized", job.id)
            trim_heap()
            return None
        except RenderError as e:
            job.deliver(Failed("invalid_request", str(e)))
            return None
        except Exception as e:  # a tokenizer bug must not end the thread
            log.exception("rendering failed (job %d)", job.id)
            job.deliver(Failed("internal", f"prompt rendering failed: {e}"))
            return None
        finally:
            self._encode.cancelled = None
        if isinstance(request, CountRequest):
            # The same rendering generation uses, so the numbers agree; a
            # count may exceed the window (clients count to decide to compact).
            job.deliver(Counted(len(prompt)))
            _release(prompt)
            return None
        # At least one token of room must be left for the answer.
        if len(prompt) >= self._window:
            job.deliver(Failed("invalid_request",
                               f"prompt is too long: {len(prompt)} tokens > "
                               f"{self._window - 1} maximum"))
            _release(prompt)
            return None
        max_tokens = min(request.max_tokens, self._window - len(prompt))
        try:
            parser, constraint = self._style.output(request, prompt, thinking)
        except GrammarError as e:
            job.deliver(Failed("invalid_request", f"cannot constrain the answer: {e}"))
            return None
        except Exception as e:
            log.exception("grammar set-up failed (job %d)", job.id)
            job.deliver(Failed("internal", f"grammar set-up failed: {e}"))
            return None
        log.debug("job %d: %d prompt tokens, rendered, tokenized and constrained in "
                  "%.1f ms", job.id, len(prompt), (time.perf_counter() - started) * 1000)
        return Prepared(job, Accepted(len(prompt), max_tokens, constraint is not None,
                                      applied),
                        prompt, max_tokens, parser, constraint,
                        kv_bytes=(len(prompt) + max_tokens) * self._kv_per_token)

    def _render(self, request, thinking):
        """The prompt tokens after the request's context edits, and the edits
        that changed it (each with the tokens it freed)."""
        def render(messages):
            return render_prompt(self._tokenizer, messages, request.tools,
                                 self._encode, thinking)

        messages = request.messages
        if request.context_edits:  # the edits read Messages
            messages = tuple(as_message(m) for m in messages)
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


class Prompts:
    """The two prompt threads: ``submit(job)`` queues a job for its thread
    (counts on one, generation on the other); prepared generation requests
    go, as lists, to ``hand_over`` (the engine's inbox). ``pending``: the
    generation jobs submitted and not yet taken in by the engine (which
    calls ``taken(n)``). ``start(make_admission)`` once the model is loaded
    (jobs submitted before then wait); ``stop()`` ends both threads."""

    def __init__(self, hand_over):
        self._hand_over = hand_over
        self._lines = {"generation": thread_queue.SimpleQueue(),
                       "counts": thread_queue.SimpleQueue()}
        self._threads = []
        self._lock = threading.Lock()
        self.pending = 0

    def start(self, make_admission):
        for name, line in self._lines.items():
            thread = threading.Thread(target=self._serve, args=(line, make_admission(),
                                                                name == "generation"),
                                      name=f"pensieve-prompts-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, job):
        if isinstance(job.request, CountRequest):
            self._lines["counts"].put(job)
            return
        self._settle(+1)
        self._lines["generation"].put(job)

    def taken(self, n):
        """The engine took in ``n`` handed-over jobs."""
        self._settle(-n)

    def stop(self, timeout=None):
        for line in self._lines.values():
            line.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def _settle(self, n):
        with self._lock:
            self.pending += n

    def _serve(self, line, admit, generation):
        while True:
            job = line.get()
            ready = []
            while job is not None:
                prepared = self._prepare(job, admit)
                if prepared is not None:
                    ready.append(prepared)
                elif generation:
                    self._settle(-1)  # answered, or dropped: never handed over
                if len(ready) >= HAND_OVER_MAX:
                    break
                try:
                    job = line.get_nowait()
                except thread_queue.Empty:
                    break
            if ready:
                self._hand_over(ready)
            if job is None:
                return

    @staticmethod
    def _prepare(job, admit):
        if job.cancelled:
            log.info("job %d cancelled while waiting", job.id)
            return None
        return admit(job)
