"""One accepted request's way out, and the model's output style.

Owns: ``Slot``, a request from its acceptance to its end: its prompt and
budget, and the pipeline each generated token goes through (the streaming
detokenizer, the stop-sequence matcher, the output parser, delivery to the
request's owner), ending in ``Finished`` or ``Failed``; and ``OutputStyle``,
how this model writes tool calls and thinks, which gives each request its
output parser and grammar constraint.

Never: calls the model or decides who runs (engine/runners.py and
engine/engine.py do). Runs on the engine thread (``OutputStyle.output``,
on the generation prompt thread, engine/prompts.py); what it sends leaves only
through the job's ``deliver``, as engine/messages.py's frozen types.
"""

import functools
import logging
import time

from . import grammar as grammars
from .messages import Failed, Finished, GenerationRequest
from .text import StopMatcher, template_takes_tools
from .tools import (FALLBACK_FORMAT, JSON_TOOLS_FORMAT, CallFormat, OutputParser, grammar,
                    grammar_subjects)

log = logging.getLogger("pensieve.engine")


@functools.lru_cache(maxsize=64)
def _shared_sampler(temperature, top_p, top_k):
    """One sampler per setting, shared: a batch whose requests share a sampler
    samples in one call instead of one per request."""
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p, top_k=top_k)


def sampler(request, vocab_size, constraint=None):
    """The sampler of ``request``, through its grammar ``constraint`` if any."""
    # top_k beyond the vocabulary means "no limit" (argpartition would fail).
    top_k = request.top_k if request.top_k and request.top_k < vocab_size else 0
    base = _shared_sampler(request.temperature, request.top_p or 0.0, top_k)
    return constraint.sampler(base) if constraint is not None else base


class Slot:
    """A request the engine has accepted, from the line to its end.

    ``unread``: the prompt tokens the model has not read yet (all of them
    until it starts; the cached prefix counts as read). ``sampler`` and
    ``processors`` (its grammar constraint, if any) are what the model's
    generation loops take.
    """

    def __init__(self, job, prompt, max_tokens, parser, constraint, style, kv_bytes=0):
        self.job = job
        self.prompt = prompt  # token ids
        self.max_tokens = max_tokens
        self.kv_bytes = kv_bytes  # the KV cache its prompt and answer can fill
        self.waited = False  # logged once as waiting for KV memory
        self.parser = parser  # generated text -> text, thinking and call events
        self.constraint = constraint  # grammar.Constraint, or None
        self.processors = [constraint] if constraint is not None else []
        self.sampler = sampler(job.request, style.vocab_size, constraint)
        self.accepted_at = time.perf_counter()
        self.cached = 0  # prompt tokens taken from the prompt cache
        self.unread = len(prompt)
        self.detokenizer = style.tokenizer.detokenizer  # a fresh one
        self._eos = style.eos
        self.stops = StopMatcher(job.request.stop_sequences)
        self._stop_sequences = bool(job.request.stop_sequences)
        self.output_tokens = 0
        self.first_token_at = None

    def deliver_token(self, token):
        """Count and deliver one generated token (its text, if any). Returns
        (stop_reason, stop_sequence) if it ends the request, else None;
        raises GrammarFailed once its grammar has failed (the token was
        sampled unconstrained, so it is not delivered)."""
        if self.constraint is not None and self.constraint.broken:
            raise grammars.GrammarFailed(self._grammar_failure())
        self.output_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self._eos:  # the end: not text
            return self.flush("end_turn")
        detokenizer = self.detokenizer
        detokenizer.add_token(token)
        if self._stop_sequences:
            text, matched = self.stops.feed(detokenizer.last_segment)
        else:  # the common case: nothing to hold back
            text, matched = detokenizer.last_segment, None
        if text:
            self._deliver_text(text)
        if matched is not None:
            return self.flush("stop_sequence", matched)
        if self.output_tokens >= self.max_tokens:
            return self.flush("max_tokens")
        return None

    def _deliver_text(self, text):
        """Text goes through the request's output parser, which sends text,
        thinking and tool calls as they are recognised."""
        for event in self.parser.feed(text):
            self.job.deliver(event)

    def flush(self, stop_reason, matched=None):
        """Deliver the detokenizer's, the stop matcher's and the parser's
        held-back text (a stop sequence may still complete in the
        detokenizer's last piece). Returns (stop_reason, stop_sequence)."""
        if matched is None:
            self.detokenizer.finalize()
            text, matched = self.stops.feed(self.detokenizer.last_segment)
            if matched is None:
                text += self.stops.flush()
            if text:
                self._deliver_text(text)
        parser = self.parser
        cut_off = parser.in_call
        for event in parser.finish():
            self.job.deliver(event)
        if matched is not None:
            return "stop_sequence", matched
        if stop_reason == "end_turn" and parser.calls and not cut_off:
            return "tool_use", None
        return stop_reason, None

    def finish(self, stop_reason, stop_sequence, stored):
        """Send Finished; ``stored``: its KV cache went to the prompt cache."""
        now = time.perf_counter()
        decode_s = now - self.first_token_at
        read = len(self.prompt) - self.cached
        self.job.deliver(Finished(
            stop_reason, stop_sequence, len(self.prompt), self.output_tokens,
            time_to_first_token=self.first_token_at - self.accepted_at,
            decode_tps=(self.output_tokens - 1) / decode_s if decode_s > 0 else 0.0,
            cached_tokens=self.cached,
            cache_created_tokens=read if stored and self.job.request.cache_hint else 0))

    def fail(self, error):
        """Send Failed for ``error`` (the caller logs it): a grammar that
        failed is the request's schema's fault, anything else is ours."""
        if isinstance(error, grammars.GrammarFailed):
            self.job.deliver(Failed("invalid_request", str(error)))
        else:
            self.job.deliver(Failed("internal", f"generation failed: {error}"))

    def _grammar_failure(self):
        """What failed, naming the schema: the call being written, else every
        schema the grammar held to (its failure may come before a name)."""
        constraint = self.constraint
        calling = self.parser.calling
        subjects = (calling,) if calling in constraint.subjects else constraint.subjects
        named = " or ".join(f'the input_schema of tool "{s}"' if s is not None
                            else "the answer's schema (output_config.format)"
                            for s in subjects) or "the answer's grammar"
        return (f"cannot constrain the answer: the grammar of {named} failed after "
                f"{constraint.seen} tokens ({constraint.error}); simplify that schema")


class OutputStyle:
    """How this model writes calls and thinks, and the grammar engine.

    ``think``: the (start, end) markers of a thinking block, or None;
    ``constrained``: grammars are on (llguidance installed and asked for).
    """

    def __init__(self, tokenizer, vocab_size, constrain=True):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = tokenizer.eos_token_ids
        self.call_format = FALLBACK_FORMAT
        if template_takes_tools(tokenizer):
            start = getattr(tokenizer, "tool_call_start", None)
            parse = getattr(tokenizer, "tool_parser", None)
            module = getattr(parse, "__module__", "") or ""
            if start is None or module.endswith("json_tools"):
                self.call_format = JSON_TOOLS_FORMAT
            else:  # a format of its own: read by mlx-lm's parser, not constrained
                self.call_format = CallFormat(open=start, close=tokenizer.tool_call_end,
                                              parse=parse, name=module.rsplit(".", 1)[-1])
        self.think = None
        self._think_end_tokens = None
        if getattr(tokenizer, "has_thinking", False):
            self.think = (tokenizer.think_start, tokenizer.think_end)
            self._think_end_tokens = tuple(tokenizer.think_end_tokens)
        self._grammars = self._load_grammars(constrain)
        log.info("tool calls: %s format, %s", self.call_format.name,
                 "constrained by grammar" if self.constrained else "unconstrained")

    def _load_grammars(self, constrain):
        if not constrain:
            log.info("constrained decoding is off (--grammar off): tool calls and "
                     "JSON answers are parsed, not guaranteed")
        elif not grammars.available():
            log.warning("llguidance is not installed: tool calls and JSON answers are "
                        "not constrained (pip install llguidance)")
        else:
            try:
                return grammars.Grammars(self.tokenizer, self.vocab_size)
            except Exception as e:
                log.warning("constrained decoding unavailable for this tokenizer: %s", e)
        return None

    @property
    def constrained(self):
        return self._grammars is not None

    def thinking(self, request):
        """Whether to ask the template to think (None: its default)."""
        thinking = getattr(request, "thinking", None)
        if isinstance(request, GenerationRequest) and self.think:
            # A forced call starts at once (as the API refuses thinking
            # with it); a JSON answer thinks first only when asked to.
            if request.tool_choice not in ("auto", "none") or (
                    request.answer_schema is not None and not thinking):
                thinking = False
        return thinking

    def output(self, request, prompt, thinking):
        """The parser of this request's output and its grammar constraint (or
        None); a grammar that cannot be compiled raises GrammarError."""
        may_think = self.think is not None and thinking is not False
        in_thinking = False
        if may_think:
            tail = self.tokenizer.decode(prompt[-4:])
            in_thinking = tail.rstrip().endswith(self.think[0])
        offered = request.offered
        constraint = None
        if self._grammars is not None:
            tools = [(t.name, t.input_schema) for t in offered]
            text = grammar(self.call_format, tools, request.tool_choice,
                           request.answer_schema, request.parallel_calls,
                           lead_space=may_think)
            if text is not None:
                # A thinking block comes first, unconstrained.
                constraint = grammars.Constraint(
                    self._grammars.matcher(text), self.vocab_size,
                    arm_after=self._think_end_tokens if may_think else None,
                    subjects=grammar_subjects(self.call_format, tools,
                                              request.tool_choice, request.answer_schema),
                    on_failure=functools.partial(self._grammars.forget, text))
        specs = [{"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema}} for t in offered]
        parser = OutputParser(self.call_format, [t.name for t in offered],
                              thinking=self.think, in_thinking=in_thinking,
                              stream_arguments=constraint is not None,
                              calls=request.tool_choice != "none", tool_specs=specs)
        return parser, constraint
