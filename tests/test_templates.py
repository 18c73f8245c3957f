"""Templates other than SmolLM2's: reasoning, and tools of their own.

A tiny random model gets SmolLM2's tokenizer plus ``<think>``/``</think>``
tokens and a Qwen3-style template of our own: its generation prompt opens
the thinking block (``<think>\n``), or, with thinking disabled, writes an
empty one, so the answer starts after it. A random model never closes its
thinking by chance, so with thinking on its whole answer is thinking.
Another gets a template that takes tools and writes calls the way mlx-lm's
"json_tools" parser reads them (``<tool_call>\n{...}\n</tool_call>``).
"""

import json
import shutil

import anthropic
import pytest

from helpers import API_KEY, ServerThread, write_tiny_llama
from pensieve import Config

NL = "{{ '\\n' }}"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}" + NL
    + "{% if m.role == 'assistant' and m.reasoning_content %}<think>" + NL
    + "{{ m.reasoning_content }}" + NL + "</think>" + NL + NL + "{% endif %}"
    + "{{ m.content }}<|im_end|>" + NL + "{% endfor %}"
    + "{% if add_generation_prompt %}<|im_start|>assistant" + NL
    + "{% if enable_thinking is defined and enable_thinking is false %}<think>" + NL + NL
    + "</think>" + NL + NL + "{% else %}<think>" + NL + "{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def thinking_model_dir(smollm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("thinking-model")
    write_tiny_llama(out, vocab_size=49154)
    tokenizer = json.loads((smollm_dir / "tokenizer.json").read_text())
    for i, content in enumerate(("<think>", "</think>")):
        tokenizer["added_tokens"].append({
            "id": 49152 + i, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": False})
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    config.pop("added_tokens_decoder", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def client(thinking_model_dir):
    srv = ServerThread(Config(host="127.0.0.1", port=0, model=str(thinking_model_dir),
                              cpu_weights="stored", default_temperature=0.0)).start()
    yield anthropic.Anthropic(base_url=srv.url, api_key=API_KEY, max_retries=0)
    srv.stop()


ASK = [{"role": "user", "content": "Why is the sky blue?"}]


def test_thinking_streams_as_a_thinking_block_with_a_signature(client):
    with client.messages.stream(model="m", max_tokens=10, messages=ASK,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        events = list(s)
        message = s.get_final_message()
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas[0] == "thinking_delta" and deltas[-1] == "signature_delta"
    assert deltas.count("signature_delta") == 1
    (block,) = message.content
    assert block.type == "thinking" and block.thinking and block.signature
    assert message.stop_reason == "max_tokens"


def test_adaptive_thinking_non_streaming(client):
    message = client.messages.create(model="m", max_tokens=6, messages=ASK,
                                     thinking={"type": "adaptive"})
    assert [b.type for b in message.content] == ["thinking"]
    assert message.content[0].signature


def test_disabled_thinking_asks_the_template_not_to_think(client):
    message = client.messages.create(model="m", max_tokens=6, messages=ASK,
                                     thinking={"type": "disabled"})
    assert [b.type for b in message.content] == ["text"]
    # The template wrote an empty thinking block into the prompt instead.
    on = client.messages.count_tokens(model="m", messages=ASK).input_tokens
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens > on


def test_thinking_in_history_is_rendered_for_the_template(client, thinking_model_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from engine.text import render_text
    from pensieve import parse_messages_request

    history = ASK + [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Rayleigh scattering.", "signature": "x"},
            {"type": "text", "text": "Scattering."}]},
        {"role": "user", "content": "More?"}]
    gen = parse_messages_request(json.dumps(
        {"model": "m", "max_tokens": 5, "messages": history}).encode()).generation
    text = render_text(load_tokenizer(thinking_model_dir), gen.messages)
    assert "<think>\nRayleigh scattering.\n</think>\n\nScattering.<|im_end|>" in text
    # And the server takes that history.
    assert client.messages.create(model="m", max_tokens=3, messages=history).content


# --- A template with tools of its own (mlx-lm reads its calls as "json_tools") -------

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system" + NL + "<tools>{% for t in tools %}" + NL
    + "{{ t | tojson }}{% endfor %}" + NL + "</tools><|im_end|>" + NL + "{% endif %}"
    + "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user" + NL
    + "<tool_response>" + NL + "{{ m.content }}" + NL + "</tool_response><|im_end|>" + NL
    + "{% else %}<|im_start|>{{ m.role }}" + NL + "{{ m.content }}"
    + "{% for tool_call in m.tool_calls or [] %}{% set tool_call = tool_call.function %}"
    + "<tool_call>" + NL + '{"name": "{{ tool_call.name }}", "arguments": '
    + "{{ tool_call.arguments | tojson }}}" + NL + "</tool_call>{% endfor %}<|im_end|>" + NL
    + "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant" + NL
    + "{% endif %}")

WEATHER = {"name": "weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "required": ["city", "unit"], "properties": {
               "city": {"type": "string", "maxLength": 20},
               "unit": {"enum": ["c", "f"]}}}}


@pytest.fixture(scope="module")
def tools_model_dir(smollm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tools-model")
    write_tiny_llama(out, window=1024)
    shutil.copy(smollm_dir / "tokenizer.json", out)
    config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_a_template_with_tools_renders_and_constrains_its_own_format(tools_model_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from engine.text import render_text
    from pensieve import parse_messages_request

    srv = ServerThread(Config(host="127.0.0.1", port=0, model=str(tools_model_dir),
                              cpu_weights="stored", default_temperature=0.0)).start()
    try:
        client = anthropic.Anthropic(base_url=srv.url, api_key=API_KEY, max_retries=0)
        history = [{"role": "user", "content": "Weather in Oslo?"}]
        first = client.messages.create(
            model="m", max_tokens=60, tools=[WEATHER], messages=history,
            tool_choice={"type": "tool", "name": "weather",
                         "disable_parallel_tool_use": True})
        assert first.stop_reason == "tool_use", first
        (call,) = first.content
        assert call.input["unit"] in ("c", "f") and len(call.input["city"]) <= 20
        history += [{"role": "assistant", "content": [call.model_dump()]},
                    {"role": "user", "content": [{"type": "tool_result",
                                                  "tool_use_id": call.id,
                                                  "content": "rain"}]}]
        assert client.messages.create(model="m", max_tokens=4, tools=[WEATHER],
                                      messages=history).content
    finally:
        srv.stop()
    # The template got the tools and the call in its own form, and the first
    # turn's prompt is a prefix of the second's.
    tokenizer = load_tokenizer(tools_model_dir)
    assert tokenizer.tool_call_start == "<tool_call>"  # mlx-lm knows this format

    def render(messages):
        gen = parse_messages_request(json.dumps(
            {"model": "m", "max_tokens": 5, "tools": [WEATHER],
             "messages": messages}).encode()).generation
        return render_text(tokenizer, gen.messages, gen.tools)

    one, two = render(history[:1]), render(history)
    assert two.startswith(one) and '"name": "weather"' in one.split("<|im_start|>user")[0]
    arguments = json.dumps(call.input, ensure_ascii=False)
    assert ('<tool_call>\n{"name": "weather", "arguments": ' + arguments
            + '}\n</tool_call>') in two
    assert "<tool_response>\nrain\n</tool_response>" in two
