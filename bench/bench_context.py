"""Serving a model past its trained window: which fixed RoPE scaling keeps the most.

    .venv/bin/python bench/bench_context.py MODEL_DIR [--window 32768]
        [--scalings none,linear,yarn,ntk] [--lengths 4096,12288,32000] [--record]

For each scaling (engine.models.rope_config builds exactly what the server
loads with ``--context-window``), on the model in float32 as the CPU backend
serves it:
  answers   greedy answers to short questions (the expected word must appear;
            the first one must read "The capital of France is Paris.");
  needle    a sentence holding a code word hidden at 10% to 90% of a
            haystack of Claude Code's own prompt text, at each length; found
            when the greedy continuation of the sentence's start, asked at
            the end, repeats the code word;
  loss      mean negative log-likelihood of the last 1,024 tokens of this
            project's own source code, read after each length of the code
            before them (lower is better; the 2,048-token row is the
            short-context reference every scaling should keep).
Prints one table row per scaling and length; --record appends the tables to
bench/RESULTS.md. A long run wants a GPU: on the lent H200 the whole sweep
takes minutes, on a 2-core CPU a 32k-token read alone takes half an hour.
"""

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import publish  # noqa: E402

QUESTIONS = [("What is the capital of France?", "Paris"),
             ("What is 2+2?", "4"),
             ("What color is the sky on a clear day?", "blue"),
             ("What is the largest planet in our solar system?", "Jupiter"),
             ("How many days are in a week?", "seven|7"),
             ("What is the capital of Japan?", "Tokyo"),
             ("What is the capital of Italy?", "Rome"),
             ("What is the boiling point of water in Celsius?", "100"),
             ("Who wrote Romeo and Juliet?", "Shakespeare"),
             ("What gas do plants absorb from the air?", "carbon dioxide|CO2"),
             ("How many legs does a spider have?", "eight|8"),
             ("What is the opposite of hot?", "cold"),
             ("What is the chemical symbol for water?", "H2O"),
             ("What is the capital of Germany?", "Berlin"),
             ("What is 10 times 10?", "100"),
             ("What planet is known as the Red Planet?", "Mars"),
             ("What is the freezing point of water in Celsius?", "0|zero"),
             ("What language is spoken in Spain?", "Spanish"),
             ("How many continents are there?", "seven|7"),
             ("What is the largest ocean on Earth?", "Pacific")]
FRANCE = "The capital of France is Paris."
CODE_WORD = "plum-7413"
NEEDLE = f"\nImportant: the secret code word is {CODE_WORD}. Remember it.\n"
# The needle is asked for by completion, not by a chat question: a 135M model
# fails the question even at 2k tokens, while copying from far back is what
# a scaling must keep.
QUESTION = "\n\nImportant: the secret code word is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# A variant measured beside the server's own kinds: a fixed NTK base for
# twice the factor. (yarn-tX: YaRN with its temperature's mscale at X.)
VARIANTS = {"ntk-x2": ("ntk", 2, {})}
LOSS_TOKENS = 1024
LOSS_REFERENCE = 2048
PREFILL_CHUNK = 2048


def haystack_text():
    """Claude Code's real prompt text: its system prompt and tool descriptions."""
    parts = []
    for path in sorted((ROOT / "tests" / "captures").glob("claude-*/*.json")):
        body = json.loads(path.read_text()).get("body") or {}
        for block in body.get("system") or []:
            if isinstance(block, dict) and not block["text"].startswith("x-anthropic"):
                parts.append(block["text"])
        parts += [t.get("description", "") for t in body.get("tools") or []]
    return "\n\n".join(dict.fromkeys(p for p in parts if p))


def source_text():
    files = [ROOT / "pensieve.py", *sorted((ROOT / "engine").glob("*.py")),
             *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    return "\n\n".join(f.read_text() for f in files)


def load_variant(model_dir, scaling, window):
    import mlx.core as mx
    from mlx_lm import load

    from engine.models import dequantize_model, rope_config

    config = json.loads((Path(model_dir) / "config.json").read_text())
    trained = config["max_position_embeddings"]
    kind, more, extra = VARIANTS.get(scaling, (scaling, 1, {}))
    if scaling.startswith("yarn-t") and scaling not in VARIANTS:  # yarn-t0.5: a milder
        kind, extra = "yarn", {"mscale": float(scaling[len("yarn-t"):])}  # temperature
    overrides = {} if kind == "none" else rope_config(config, kind, more * window / trained)
    if extra:
        overrides["rope_scaling"] = {**overrides["rope_scaling"], **extra}
    model, tokenizer = load(str(model_dir), model_config=overrides)
    dequantize_model(model)
    mx.eval(model.parameters())
    return model, tokenizer


def prefill(model, tokens):
    """The cache after ``tokens[:-1]`` and the logits of the last token."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for i in range(0, len(tokens) - 1, PREFILL_CHUNK):
        model(mx.array(tokens[i:min(i + PREFILL_CHUNK, len(tokens) - 1)])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache, model(mx.array(tokens[-1:])[None], cache=cache)[0, -1]


def greedy(model, tokenizer, tokens, n=24):
    import mlx.core as mx

    cache, logits = prefill(model, tokens)
    out = []
    for _ in range(n):
        token = int(mx.argmax(logits).item())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return tokenizer.decode(out)


def chat(tokenizer, text):
    return tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)


def needle_prompt(tokenizer, filler_ids, length, depth):
    """About ``length`` tokens of filler with the needle at ``depth``, ending
    where the code word should be repeated."""
    room = length - len(tokenizer.encode(NEEDLE + QUESTION)) - 8
    ids = (filler_ids * (room // len(filler_ids) + 1))[:room]
    text = tokenizer.decode(ids)
    at = text.rfind("\n", 0, int(len(text) * depth)) + 1
    return tokenizer.encode(text[:at] + NEEDLE + text[at:] + QUESTION,
                            add_special_tokens=False)


def loss(model, tokens):
    """Mean negative log-likelihood of the last LOSS_TOKENS of ``tokens``."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    head = len(tokens) - LOSS_TOKENS
    for i in range(0, head, PREFILL_CHUNK):
        model(mx.array(tokens[i:min(i + PREFILL_CHUNK, head)])[None], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(mx.array(tokens[head - 1:-1])[None], cache=cache)[0].astype(mx.float32)
    targets = mx.array(tokens[head:])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -mx.mean(mx.take_along_axis(logprobs, targets[:, None], axis=-1)).item()


def measure(model, tokenizer, lengths):
    import re

    answers = [greedy(model, tokenizer, chat(tokenizer, q)) for q, _ in QUESTIONS]
    row = {"france": answers[0].strip() == FRANCE,
           "answers": sum(bool(re.search(want, a, re.I))
                          for (_, want), a in zip(QUESTIONS, answers)),
           "first_answer": answers[0].strip(), "needle": {}, "loss": {}}
    filler = tokenizer.encode(haystack_text(), add_special_tokens=False)
    source = tokenizer.encode(source_text(), add_special_tokens=False)
    for length in lengths:
        found = []
        for depth in DEPTHS:
            answer = greedy(model, tokenizer, needle_prompt(tokenizer, filler, length, depth))
            found.append(CODE_WORD in answer)
        row["needle"][length] = sum(found)
    for length in sorted({LOSS_REFERENCE, *lengths}):
        text = (source * (length // len(source) + 1))[:length + LOSS_TOKENS]
        row["loss"][length] = round(loss(model, text), 3)
    return row


def table(results, lengths, window):
    lines = [f"| scaling (window {window}) | France answer exact | short answers right "
             f"(of {len(QUESTIONS)}) | " + " | ".join(f"needle at {n} (of {len(DEPTHS)})"
                                                      for n in lengths)
             + " | " + " | ".join(f"loss after {n}" for n in
                                  sorted({LOSS_REFERENCE, *lengths})) + " |"]
    lines.append("|" + "---|" * (3 + len(lengths) + len({LOSS_REFERENCE, *lengths})))
    for name, row in results.items():
        lines.append(f"| {name} | {'yes' if row['france'] else 'no: ' + row['first_answer']!r}"
                     f" | {row['answers']} | "
                     + " | ".join(str(row["needle"][n]) for n in lengths) + " | "
                     + " | ".join(f"{row['loss'][n]:.3f}" for n in
                                  sorted({LOSS_REFERENCE, *lengths})) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--window", type=int, default=32768)
    parser.add_argument("--scalings", default="none,linear,yarn,ntk")
    parser.add_argument("--lengths", default="4096,12288,32000")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    import mlx.core as mx

    lengths = [int(n) for n in args.lengths.split(",")]
    results = {}
    for scaling in args.scalings.split(","):
        started = time.perf_counter()
        model, tokenizer = load_variant(args.model_dir, scaling, args.window)
        results[scaling] = measure(model, tokenizer, lengths)
        print(scaling, json.dumps(results[scaling]), f"{time.perf_counter() - started:.0f} s",
              flush=True)
        if args.json:  # after each, so a cut-off run keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=1))
    publish(f"## Context window past training: RoPE scalings ({date.today()})\n\n"
            f"`python bench/bench_context.py MODEL --window {args.window} "
            f"--scalings {args.scalings} --lengths {args.lengths}`; "
            f"{platform.node() or platform.machine()}, mlx {mx.__version__}, "
            f"{mx.default_device()}, float32 weights.\n\n"
            + table(results, lengths, args.window), args.record)


if __name__ == "__main__":
    main()
