"""Running requests on the model: one alone, or several in a batch.

Owns: every call into the model and the model state of each running
request (its KV cache and the tokens in it). ``Solo`` runs a request alone
on a plain KV cache (mlx-lm's generate_step); ``Batch`` runs several
together (mlx-lm's BatchGenerator). Both read prompts a slice per step
(``prefill_slice``) and hand each generated token to its Slot (``_emit``).
``Runners`` puts the two behind one interface (add, step, remove, how many
run, whether there is room) and owns the hand-over between them;
``warm_up`` is the forward pass before serving.

Never: decides who runs or when (engine/engine.py's scheduler does), keeps
finished requests' caches (the engine's prompt cache does, through the
``ended`` callback), or talks to the server: output leaves through Slots.

Why two ways to run: a batch of one pays the batch's bookkeeping on every
token (measured on an H100: half the decode rate), and one request at a
time is the common case of a single user. So a request alone runs solo; it
joins the batch when another arrives, and the last request left in a batch
goes solo again (``Runners.regroup``), without losing or repeating a token.
"""

import logging
from dataclasses import dataclass

from .grammar import GrammarFailed
from .progress import step as progress_step

log = logging.getLogger("pensieve.engine")

# The smallest slice of a prompt read in one step when many share the chunk.
PREFILL_MIN_SLICE = 16


def prefill_slice(chunk, reading, running):
    """Prompt tokens each of the ``reading`` prompts reads this step, of
    ``running`` requests. While others decode, the prompts being read share
    one chunk, so each step keeps the others' next token as near as one
    chunk; with nobody waiting on a token each prompt gets a whole chunk."""
    if reading < running:
        return max(chunk // max(reading, 1), PREFILL_MIN_SLICE)
    return chunk


@dataclass(slots=True)
class State:
    """A request's model state, as runners hand it over: its KV ``cache``, the
    ``tokens`` in it, ``rest``: the prompt tokens not yet read (empty once it
    decodes), and ``next_token``: a token of the answer not yet fed to the
    model (None while reading, or while generate_step holds the last one)."""

    cache: list
    tokens: list
    rest: list
    next_token: int | None = None


def warm_up(model, tokenizer):
    """One forward pass before serving: a GPU compiles its kernels on first
    use (seconds on CUDA), which would otherwise land on the first request.
    Returns the KV cache a token takes (0 if unknown)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    per_token = 0
    try:
        with progress_step("warming up"):
            tokens = tokenizer.encode("Hello") or [0]
            cache = make_prompt_cache(model)
            mx.eval(model(mx.array([tokens]), cache=cache))
            # Caches allocate in steps: bytes over the positions allocated.
            per_token = sum(c.nbytes // c.keys.shape[-2] for c in cache
                            if getattr(c, "keys", None) is not None)
    except Exception as e:  # a model that needs more than tokens: serve anyway
        log.warning("warm-up skipped (%s): the first request pays for it", e)
    mx.clear_cache()
    return per_token


class _Runner:
    """What Solo and Batch share: the per-token path and the way out.

    ``ended(slot, (stop_reason, stop_sequence), cache, tokens)`` is called
    once a request has ended and left, with its KV cache to keep.
    """

    def __init__(self, model, stream, chunk, ended):
        self._model = model
        self._stream = stream
        self._chunk = chunk
        self._ended = ended

    def _emit(self, slot, token, finished=None):
        """Deliver one generated token of ``slot``; if that ends it, it leaves.
        ``finished``: the generator's own result when it ended the request."""
        reason = slot.deliver_token(token)
        if reason is None and finished is not None:  # the generator's count ran out
            reason = slot.flush("max_tokens")
        if reason is not None:
            self._end(slot, reason, finished)

    def _end(self, slot, reason, finished=None):
        cache, tokens = self.remove(slot, finished)
        self._ended(slot, reason, cache, tokens)

    def fail(self, slot, error):
        """``slot`` alone fails: it is told why and leaves, its cache dropped.
        A grammar that failed is the request's doing: one line, no traceback."""
        if isinstance(error, GrammarFailed):
            log.warning("job %d failed: %s", slot.job.id, error)
        else:
            log.exception("job %d failed", slot.job.id, exc_info=error)
        slot.fail(error)
        if slot in self:
            self.remove(slot, keep=False)


class Solo(_Runner):
    """The request running alone (``slot``, or None), its State, and once it
    decodes, ``steps``: mlx-lm's generate_step, which pipelines each step's
    model call with the last one's readback (every token it has yielded is
    in the cache)."""

    def __init__(self, model, stream, chunk, ended):
        super().__init__(model, stream, chunk, ended)
        self.slot = None
        self._state = None
        self._steps = None

    def __len__(self):
        return 0 if self.slot is None else 1

    def __contains__(self, slot):
        return slot is not None and slot is self.slot

    @property
    def reading(self):
        """Whether its request is still reading its prompt (no token yet)."""
        return (self.slot is not None and self._steps is None
                and self._state.next_token is None)

    def slots(self):
        return () if self.slot is None else (self.slot,)

    def add(self, slot, state):
        self.slot, self._state = slot, state
        slot.unread = len(state.rest)

    def remove(self, slot, finished=None, keep=True):
        """Take the request out; returns its (cache, tokens), or (None, None)
        when not ``keep``."""
        state = self._state
        self._close()
        self.slot = self._state = None
        return (state.cache, state.tokens) if keep else (None, None)

    def take(self):
        """Take the request out as (slot, State) for the batch. generate_step
        has fed the last token it yielded and is computing the next, which
        cannot be taken out of it: that token leaves the cache, and the
        batch feeds it again."""
        from mlx_lm.models.cache import trim_prompt_cache

        slot, state = self.slot, self._state
        if self._steps is not None:
            self._close()
            trim_prompt_cache(state.cache, 1)
            state.next_token = state.tokens.pop()
            if slot.constraint is not None:  # it has seen that token: it sees it again
                slot.constraint.unfeed(slot.constraint.seen - (slot.output_tokens - 1))
        self.slot = self._state = None
        return slot, state

    def step(self, readers=1, running=1):
        """One prefill slice (its share of a chunk: ``readers`` prompts are
        read this step, of ``running`` requests) or one decode step; a
        failure fails the request."""
        slot = self.slot
        try:
            if self.reading:
                self._read(prefill_slice(self._chunk, readers, running))
            else:
                self._decode()
        except Exception as e:
            self.fail(slot, e)

    def _read(self, size):
        """Read ``size`` tokens of the prompt; after its last token, the first
        token of the answer is computed and delivered on its own, so it
        reaches the client before the second starts computing (on a CPU that
        work takes every core, and the event loop would otherwise wait for
        one)."""
        import mlx.core as mx

        slot, state = self.slot, self._state
        model, cache, rest = self._model, state.cache, state.rest
        with mx.stream(self._stream):
            if len(rest) > 1:  # the last token is read for the first token's logits
                n = min(size, len(rest) - 1)
                chunk, state.rest = rest[:n], rest[n:]
                model(mx.array(chunk)[None], cache=cache)
                mx.eval([c.state for c in cache])
                state.tokens += chunk
                slot.unread = len(state.rest)
                return
            logits = model(mx.array(rest)[None], cache=cache)[:, -1, :]
            if slot.constraint is not None:
                logits = slot.constraint(None, logits)
            state.tokens += rest
            state.rest = []
            slot.unread = 0
            token = int(slot.sampler(
                logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item())
        state.next_token = token
        self._emit(slot, token)

    def _decode(self):
        """The next token from generate_step, started from the token
        delivered last."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        slot, state = self.slot, self._state
        if self._steps is None:
            self._steps = generate_step(
                mx.array([state.next_token]), self._model, stream=self._stream,
                prompt_cache=state.cache, sampler=slot.sampler,
                logits_processors=slot.processors or None,
                max_tokens=slot.max_tokens - slot.output_tokens)
            state.tokens.append(state.next_token)
            state.next_token = None
        token = next(self._steps, None)
        if token is None:  # its max_tokens: ours says the same, but to be sure
            return self._end(slot, slot.flush("max_tokens"))
        token = int(token[0])
        state.tokens.append(token)
        self._emit(slot, token)

    def _close(self):
        if self._steps is not None:
            self._steps.close()
            self._steps = None


class Batch(_Runner):
    """Requests decoding together in mlx-lm's BatchGenerator: each joins
    between two decode steps once its prompt has been read, and leaves when
    it ends, with its own sampler, grammar and ``max_tokens``."""

    def __init__(self, model, stream, chunk, max_running, eos, ended):
        super().__init__(model, stream, chunk, ended)
        self._max_running = max_running
        self._eos = [[t] for t in sorted(eos)]
        self._running = {}  # generator uid -> Slot
        self._generator = self._new_generator()

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator

        # The batch is bounded by the scheduler: the generator takes
        # everything it is given at once.
        return BatchGenerator(self._model, stop_tokens=self._eos,
                              completion_batch_size=self._max_running,
                              prefill_batch_size=self._max_running,
                              prefill_step_size=self._chunk, stream=self._stream)

    def __len__(self):
        return len(self._running)

    def __contains__(self, slot):
        return self._uid(slot) is not None

    def slots(self):
        return self._running.values()

    def _uid(self, slot):
        return next((uid for uid, s in self._running.items() if s is slot), None)

    def add(self, slot, state):
        """Add a request: its prompt still to read, or (decoding) the token
        to feed next, at most what is left of its ``max_tokens`` to make."""
        prompt = state.rest if state.next_token is None else [state.next_token]
        (uid,) = self._generator.insert(
            [prompt], max_tokens=[slot.max_tokens - slot.output_tokens],
            caches=[state.cache], all_tokens=[state.tokens], samplers=[slot.sampler],
            logits_processors=[slot.processors])
        slot.unread = len(state.rest)
        self._running[uid] = slot

    def remove(self, slot, finished=None, keep=True):
        """Take ``slot`` out (the generator already has when it ``finished``
        it); returns its (cache, tokens), or (None, None) when not ``keep``."""
        uid = self._uid(slot)
        del self._running[uid]
        if finished is not None:
            cache, tokens = finished.prompt_cache, finished.all_tokens
        else:
            cache, tokens = self._generator.remove(
                [uid], return_prompt_caches=keep).get(uid, (None, None))
        return (cache, tokens) if keep else (None, None)

    def take(self):
        """The only request out as (slot, State) to run solo, with its next
        token sampled, not yet fed nor delivered; None if it cannot be taken:
        still reading its prompt, or mlx-lm's internals (its generation batch
        and that batch's next tokens) are not there."""
        (uid,) = self._running
        batch = getattr(self._generator, "_generation_batch", None)
        pending = getattr(batch, "_next_tokens", None)
        if batch is None or pending is None or list(batch.uids) != [uid]:
            return None
        token = int(pending[0].item())
        slot = self._running[uid]
        if slot.constraint is not None:
            slot.constraint.unfeed(0)  # the next one reads it anew
        cache, tokens = self._generator.remove([uid], return_prompt_caches=True)[uid]
        del self._running[uid]
        return slot, State(cache, list(tokens), [], token)

    def readers(self):
        """How many of its prompts are read in slices (a prompt's last token
        is read by its first decode step: no slice)."""
        return sum(1 for slot in self._running.values() if slot.unread > 1)

    def step(self, readers, running):
        """One decode step for the batch and one prefill slice for the
        prompts being read (each its share of a chunk: ``readers`` prompts
        are read this step, of ``running`` requests), then each request's new
        token to its Slot."""
        self._generator.prefill_step_size = prefill_slice(self._chunk, readers, running)
        try:
            progress, generated = self._generator.next()
        except Exception as e:
            # The batch's state is unknown: fail the requests in it and start
            # a new one. Those waiting, and later ones, are served as usual.
            log.exception("batch step failed; failing its %d requests",
                          len(self._running))
            for slot in self._running.values():
                slot.fail(e)
            self._running.clear()
            self._generator.close()
            self._generator = self._new_generator()
            return
        for r in progress:
            slot = self._running.get(r.uid)
            if slot is not None:
                done, total = r.progress
                slot.unread = total - done
        for r in generated:
            slot = self._running.get(r.uid)
            if slot is None:
                continue
            # Our own per-request work (detokenizing, stop sequences,
            # delivery) failing ends that request alone.
            try:
                self._emit(slot, r.token, r if r.finish_reason else None)
            except Exception as e:
                self.fail(slot, e)

    def close(self):
        self._generator.close()


class Runners:
    """The solo runner and the batch behind one interface: at most one
    request runs solo, and while it decodes the batch is empty; while it
    reads its prompt, apart ("aside"), the batch runs beside it.

    ``ended(slot, (stop_reason, stop_sequence), cache, tokens)``: a request
    ended and left, with its KV cache to keep.
    """

    def __init__(self, loaded, prefill_chunk, max_running, ended):
        import mlx.core as mx

        # This thread's default stream, as mlx-lm's own server uses: mlx-lm's
        # module-level thread-local stream, used from a non-main thread,
        # aborts the process at interpreter exit ("terminate called without
        # an active exception"), and so does a stream from mx.new_stream.
        stream = mx.default_stream(mx.default_device())
        self._max_running = max_running
        self.solo = Solo(loaded.model, stream, prefill_chunk, ended)
        self.batch = Batch(loaded.model, stream, prefill_chunk, max_running,
                           loaded.tokenizer.eos_token_ids, ended)

    # Read between every two steps: no calls beyond their own (the batch's
    # dict is read directly).

    @property
    def running(self):
        """How many requests run."""
        return (self.solo.slot is not None) + len(self.batch._running)

    def has_room(self):
        """Whether the batch takes another request now (not while one decodes
        solo, which first moves into the batch: see regroup)."""
        if self.solo.slot is not None and not self.solo.reading:
            return False
        return self.running < self._max_running

    def solo_has_room(self):
        """Whether a request can start solo now (to read its prompt aside)."""
        return self.solo.slot is None and self.running < self._max_running

    def reading_aside(self):
        """The Slot of the solo request while it reads its prompt, or None."""
        return self.solo.slot if self.solo.reading else None

    def slots(self):
        """The running requests' Slots."""
        solo = self.solo.slot
        return ((solo,) if solo is not None else ()) + tuple(self.batch._running.values())

    def add(self, slot, state, alone):
        """Start ``slot`` from ``state``: solo if ``alone``, else in the batch."""
        (self.solo if alone else self.batch).add(slot, state)

    def remove(self, slot, keep=True):
        """Take ``slot`` out wherever it runs: its (cache, tokens) if ``keep``."""
        return (self.solo if slot in self.solo else self.batch).remove(slot, keep=keep)

    def fail(self, slot, error):
        """``slot`` alone fails, wherever it is (running or not yet)."""
        (self.batch if slot in self.batch else self.solo).fail(slot, error)

    def step(self, read_aside=True):
        """One step of work: for the batch, and for the solo request (not if
        it is reading its prompt aside and ``read_aside`` is False). The
        prompts read this step share one chunk while others decode."""
        solo = self.solo.slot is not None and (read_aside or not self.solo.reading)
        readers = self.batch.readers() + (solo and self.solo.reading)
        running = self.running
        if self.batch._running:
            self.batch.step(readers, running)
        if solo:
            self.solo.step(readers, running)

    def regroup(self, company):
        """The hand-over: with ``company`` (a request that would join) or a
        batch running, the solo request moves into the batch once it decodes
        (while it reads its prompt it stays aside); without either, the last
        request left in the batch goes solo (decoding only; one still reading
        its prompt stays). A move that fails fails its request."""
        if self.solo.slot is not None:
            if (company or self.batch._running) and not self.solo.reading \
                    and self._max_running > 1:
                self._guarded(self.solo.slot, self._to_batch)
        elif len(self.batch._running) == 1 and not company:
            (slot,) = self.batch._running.values()
            self._guarded(slot, self._to_solo)

    def _to_batch(self):
        self.batch.add(*self.solo.take())

    def _to_solo(self):
        taken = self.batch.take()
        if taken is None:
            return  # it simply stays in the batch
        slot, state = taken
        self.solo.add(slot, state)
        self.solo._emit(slot, state.next_token)  # sampled in the batch, delivered now

    def _guarded(self, slot, action):
        try:
            action()
        except Exception as e:
            self.fail(slot, e)

    def close(self):
        self.solo._close()
        self.batch.close()
