"""Constrained decoding: llguidance's token masks applied to MLX logits.

Owns: the grammar engine's view of the tokenizer, compiled grammars (kept
for reuse: Claude Code sends the same tools every turn), and ``Constraint``,
the per-request logits processor that masks every token the grammar forbids.

Never: decides what the grammar says (engine/tools.py does) or touches the
server. Grammars are compiled where a request is prepared (a prompt thread,
engine/prompts.py) and ``Constraint`` runs on the engine thread, inside
mlx-lm's generation loops; the store of compiled grammars, which both reach
(a grammar that failed is dropped from it), is guarded by a lock.

llguidance was chosen over xgrammar: it is one self-contained wheel with no
dependencies (xgrammar requires torch, triton and transformers), its masks
are computed in Rust in well under a millisecond, and its Lark dialect
embeds JSON schemas, which is what a tool call is. It is optional: without
it the server runs unconstrained (``available()`` says so).
"""

import threading
from collections import OrderedDict

# Compiled grammars kept: one per distinct (tools, tool_choice, format).
GRAMMAR_CACHE_ENTRIES = 16
# llguidance's error texts end in a dump of its parser state and the whole
# grammar (kilobytes, many lines); what reaches a client or the log is the
# first line, cut to this.
GRAMMAR_ERROR_CHARS = 200


class GrammarError(ValueError):
    """A grammar (usually from a tool's input_schema) that cannot be compiled."""


class GrammarFailed(GrammarError):
    """A grammar that compiled, then failed while decoding: its request fails
    (a client's error, the schema's: a 400 or the stream's error event)."""


def short_error(text):
    """The first line of an llguidance error, at most GRAMMAR_ERROR_CHARS."""
    lines = (text or "").strip().splitlines()
    line = lines[0].strip() if lines else "unknown grammar error"
    if len(line) > GRAMMAR_ERROR_CHARS:
        line = line[:GRAMMAR_ERROR_CHARS] + "..."
    return line


def available():
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class Grammars:
    """Compiles grammars for one tokenizer and hands out fresh matchers."""

    def __init__(self, tokenizer, vocab_size):
        import llguidance

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GrammarError("the tokenizer is not a fast (Rust) tokenizer")
        self._llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            backend.to_str(), n_vocab=vocab_size,
            eos_token=sorted(tokenizer.eos_token_ids))
        self._compiled = OrderedDict()  # grammar text -> pristine matcher
        self._lock = threading.Lock()  # over _compiled (not over compiling)

    def matcher(self, text):
        """A fresh matcher for the Lark grammar ``text``."""
        with self._lock:
            pristine = self._compiled.get(text)
            if pristine is not None:
                self._compiled.move_to_end(text)
        if pristine is None:
            pristine = self._compile(text)
            with self._lock:
                self._compiled[text] = pristine
                while len(self._compiled) > GRAMMAR_CACHE_ENTRIES:
                    self._compiled.popitem(last=False)
        return pristine.deep_copy()

    def forget(self, text):
        """Drop the compiled ``text``: its matchers share their lexer's state,
        and once one has failed on a limit of it, every copy fails at once."""
        with self._lock:
            self._compiled.pop(text, None)

    def _compile(self, text):
        LLMatcher = self._llg.LLMatcher
        source = LLMatcher.grammar_from_lark(text)
        error = LLMatcher.validate_grammar(source, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(short_error(error))
        pristine = LLMatcher(self.tokenizer, source, log_level=0)
        if pristine.is_error():
            raise GrammarError(short_error(pristine.get_error()))
        return pristine


class Constraint:
    """Masks one request's logits to the tokens its grammar allows.

    Called as an mlx-lm logits processor, ``(tokens, logits) -> logits``,
    once per generated token: from the second call on, the last of
    ``tokens`` is the token just sampled, which the matcher consumes before
    the next mask. The first call is for the first token of the answer.
    ``arm_after``: token ids (a thinking block's end) before which nothing
    is constrained. ``subjects``: the schemas the grammar holds to (tool
    names, None for the answer's), for the error when it fails;
    ``on_failure``: called once if it does.
    """

    def __init__(self, matcher, vocab_size, arm_after=None, subjects=(), on_failure=None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.arm_after = tuple(arm_after) if arm_after else None
        self.armed = self.arm_after is None
        self.started = False  # the first mask has been made
        self.seen = 0  # generated tokens this constraint has been shown
        self.subjects = tuple(subjects)
        self._on_failure = on_failure
        self.broken = False
        self.error = None  # why it broke: one short line
        self.sampled = None  # what the sampler drew last, not yet fed
        self._recent = []

    def sampler(self, base):
        """``base`` sampler, remembering what it sampled: the next call reads
        the token from that array, already scheduled by the generation loop.
        Reading it from ``tokens`` instead queues new work behind this step's
        model call and waits for that too (on an H100, 1B model: 257-277
        tok/s that way, 381-405 this way, 354-382 unconstrained)."""
        def sample(logprobs):
            self.sampled = base(logprobs)
            return self.sampled

        return sample

    def __call__(self, tokens, logits):
        if self.started:
            # No mx.async_eval(logits) first: on CUDA the wait below would then
            # wait for this step's model call as well (measured: 30% slower).
            last = tokens[-1] if self.sampled is None else self.sampled
            self.sampled = None
            self.feed(int(last.item()))  # a one-element array
        self.started = True
        return self.apply(logits)

    def feed(self, token):
        self.seen += 1
        if self.broken:
            return
        if not self.armed:
            self._recent = (self._recent + [token])[-len(self.arm_after):]
            self.armed = tuple(self._recent) == self.arm_after
            return
        if not self.matcher.consume_token(token):
            self._give_up()

    def unfeed(self, n):
        """Forget the last ``n`` tokens fed (they will be fed again)."""
        self.sampled = None
        n = min(n, self.seen)
        if n <= 0:
            return
        self.seen -= n
        if self.armed and not self.broken and not self.matcher.rollback(n):
            self._give_up()

    def apply(self, logits):
        import mlx.core as mx
        import numpy as np

        if not self.armed or self.broken:
            return logits
        bits = self.matcher.compute_bitmask()
        if self.matcher.is_error():
            self._give_up()
            return logits
        words = np.frombuffer(bits, dtype=np.uint8)
        if words.min() == 0xFF and len(words) * 8 >= logits.shape[-1]:
            return logits  # free text: every token allowed, nothing to mask
        if not words.any():  # (not even the end): sampling would be a guess
            self._give_up("the grammar allows no next token")
            return logits
        allowed = np.unpackbits(words, bitorder="little")
        width = logits.shape[-1]
        if len(allowed) < width:
            allowed = np.pad(allowed, (0, width - len(allowed)))
        allowed = mx.array(allowed[:width].astype(np.bool_))
        return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))

    def _give_up(self, error=None):
        """The grammar failed while decoding: llguidance hit one of its limits
        (its parser's item count on a recursive schema, its lexer's budget on
        a large regex). Nothing is masked from here on, and the request's
        Slot fails it at its next token: going on unconstrained would answer
        with JSON that breaks the schema. The Slot logs it, in one line."""
        self.broken = True
        self.error = short_error(error or self.matcher.get_error())
        if self._on_failure is not None:
            self._on_failure()
