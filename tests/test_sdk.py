"""End to end with the real SmolLM2-135M: the seed's curl checks and the official SDK.

The server is started as a user starts it (``python pensieve.py``) with the
embedded model; clients are curl and the official ``anthropic`` SDK, sync and
async. Generations stay short because the CPU backend decodes ~14 tok/s.
"""

import asyncio
import json
import re
import socket
import subprocess
from urllib.parse import urlparse

import anthropic
import pytest

from helpers import API_KEY

QUESTION = "What is the capital of France?"
# SDK 2.x no longer takes sampling parameters as arguments; the API still does.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(real_server):
    return anthropic.Anthropic(base_url=real_server, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def async_client(real_server):
    return anthropic.AsyncAnthropic(base_url=real_server, api_key=API_KEY,
                                    max_retries=0)


def curl(*args):
    out = subprocess.run(["curl", "-sS", "--max-time", "120", *args],
                         capture_output=True, text=True, check=True)
    return out.stdout


# --- The seed's three curl checks, verbatim --------------------------------------


def test_curl_health(real_server):
    body = json.loads(curl(f"{real_server}/health"))
    assert body["status"] == "healthy"
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["context_window"] == 8192
    assert body["device"] == "cpu"


def test_curl_message(real_server):
    out = curl("-X", "POST", f"{real_server}/v1/messages",
               "-H", "Content-Type: application/json",
               "-H", f"x-api-key: {API_KEY}",
               "-H", "anthropic-version: 2023-06-01",
               "-d", json.dumps({"model": "claude-3-5-sonnet-20241022", "max_tokens": 50,
                                 "temperature": 0,
                                 "messages": [{"role": "user", "content": QUESTION}]}))
    body = json.loads(out)
    assert body["type"] == "message"
    assert body["model"] == "claude-3-5-sonnet-20241022"
    assert body["content"][0]["text"] == "The capital of France is Paris."
    assert body["stop_reason"] == "end_turn"


def test_curl_stream(real_server):
    out = curl("-N", "-X", "POST", f"{real_server}/v1/messages",
               "-H", "Content-Type: application/json",
               "-H", f"x-api-key: {API_KEY}",
               "-H", "anthropic-version: 2023-06-01",
               "-d", json.dumps({"model": "claude-3-5-sonnet-20241022", "max_tokens": 50,
                                 "temperature": 0, "stream": True,
                                 "messages": [{"role": "user", "content": QUESTION}]}))
    events = [line[len("event: "):] for line in out.splitlines()
              if line.startswith("event: ")]
    assert events[:3] == ["message_start", "ping", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(json.loads(line[len("data: "):])["delta"]["text"]
                   for line in out.splitlines()
                   if line.startswith("data: ") and '"text_delta"' in line)
    assert text == "The capital of France is Paris."


# --- The SDK ------------------------------------------------------------------------


def test_create(client):
    msg = client.messages.create(model="claude-pensieve-test", max_tokens=50, extra_body=GREEDY,
                                 messages=[{"role": "user", "content": QUESTION}])
    assert msg.content[0].text == "The capital of France is Paris."
    assert msg.stop_reason == "end_turn"
    assert msg.model == "claude-pensieve-test"
    assert msg.id.startswith("msg_")
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 10
    assert 0 < msg.usage.output_tokens <= 50


def test_stream_final_message(client):
    with client.messages.stream(model="m", max_tokens=50, extra_body=GREEDY,
                                messages=[{"role": "user", "content": QUESTION}]) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert len(pieces) > 1  # tokens arrived one by one, not in one piece
    assert "".join(pieces) == final.content[0].text == "The capital of France is Paris."
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 1


def test_async_create_and_stream(async_client):
    async def main():
        msg = await async_client.messages.create(
            model="m", max_tokens=50, extra_body=GREEDY,
            messages=[{"role": "user", "content": QUESTION}])
        async with async_client.messages.stream(
                model="m", max_tokens=50, extra_body=GREEDY,
                messages=[{"role": "user", "content": QUESTION}]) as s:
            final = await s.get_final_message()
        return msg, final

    msg, final = asyncio.run(main())
    assert msg.content[0].text == final.content[0].text == "The capital of France is Paris."


def test_multi_turn_and_system(client):
    # The model's answer must depend on the earlier turns and on the system prompt:
    # compare input token counts and check the conversation reached the model.
    base = client.messages.create(model="m", max_tokens=5, extra_body=GREEDY,
                                  messages=[{"role": "user", "content": "Hi"}])
    longer = client.messages.create(
        model="m", max_tokens=20, extra_body=GREEDY,
        system=[{"type": "text", "text": "You are a geography teacher."}],
        messages=[{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": QUESTION}])
    def prompt(msg):
        return msg.usage.input_tokens + msg.usage.cache_read_input_tokens

    assert prompt(longer) > prompt(base) + 10
    assert "Paris" in longer.content[0].text


def test_max_tokens(client):
    msg = client.messages.create(model="m", max_tokens=3, extra_body=GREEDY,
                                 messages=[{"role": "user", "content": "Tell me a story."}])
    assert msg.stop_reason == "max_tokens"
    assert msg.usage.output_tokens == 3


def test_stop_sequence(client):
    msg = client.messages.create(model="m", max_tokens=30, extra_body=GREEDY,
                                 stop_sequences=["France is"],
                                 messages=[{"role": "user", "content": QUESTION}])
    assert msg.stop_reason == "stop_sequence"
    assert msg.stop_sequence == "France is"
    assert msg.content[0].text == "The capital of "


def test_stop_sequence_streamed(client):
    with client.messages.stream(model="m", max_tokens=30, extra_body=GREEDY,
                                stop_sequences=[" Paris"],
                                messages=[{"role": "user", "content": QUESTION}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "The capital of France is"
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == " Paris"


def test_claude_code_max_tokens_is_clamped(client):
    # An explicit timeout: the SDK refuses a non-streaming 64000-token request
    # without one.
    msg = client.messages.create(model="m", max_tokens=64000, extra_body=GREEDY,
                                 timeout=120,
                                 messages=[{"role": "user", "content": QUESTION}])
    assert msg.content[0].text == "The capital of France is Paris."


def test_prompt_too_long(client):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="m", max_tokens=10,
                               messages=[{"role": "user", "content": "hello " * 9000}])
    message = info.value.body["error"]["message"]
    assert message.startswith("prompt is too long: ")
    assert message.endswith(" tokens > 8191 maximum")


def test_wrong_key(real_server):
    bad = anthropic.Anthropic(base_url=real_server, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad.messages.create(model="m", max_tokens=5,
                            messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"extra_body": {"temperature": 3}}, "temperature"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}}]}]}, "text only"),
])
def test_bad_bodies(client, kwargs, field):
    args = {"model": "m", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**args)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert field in info.value.body["error"]["message"]


def test_disconnect_mid_stream_then_success(real_server, client, cache_dir):
    host, port = urlparse(real_server).hostname, urlparse(real_server).port
    body = json.dumps({"model": "m", "max_tokens": 400, "stream": True,
                       "messages": [{"role": "user", "content": "Write a long essay."}]})
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {API_KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  f"{body}").encode())
    received = b""
    while received.count(b"content_block_delta") < 2:
        data = sock.recv(4096)
        assert data, received
        received += data
    sock.close()
    # The 400-token essay was abandoned: this answer comes right after it, and
    # the server reports nothing left running or waiting once it is done.
    msg = client.messages.create(model="m", max_tokens=50, extra_body=GREEDY,
                                 messages=[{"role": "user", "content": QUESTION}])
    assert msg.content[0].text == "The capital of France is Paris."
    health = json.loads(curl(f"{real_server}/health"))
    assert health["running"] == 0 and health["waiting"] == 0
    log = (cache_dir / "server.log").read_text()
    assert re.search(r"job \d+ cancelled after \d+ of \d+ prompt tokens, \d+ output tokens",
                     log)


def test_cache_reads_grow_across_the_turns_of_a_session(client):
    # Shaped like Claude Code's turns: the whole conversation each time, the
    # last user message marked with cache_control, the answers streamed.
    messages, reads, prompts = [], [], []
    for question in ("Name one planet of the solar system.", "And another one?",
                     "Which of the two is bigger?"):
        messages.append({"role": "user", "content": [
            {"type": "text", "text": question, "cache_control": {"type": "ephemeral"}}]})
        with client.messages.stream(model="m", max_tokens=12, extra_body=GREEDY,
                                    messages=messages) as s:
            answer = s.get_final_message()
        used = answer.usage
        prompt = (used.input_tokens + used.cache_read_input_tokens
                  + used.cache_creation_input_tokens)
        assert prompt == client.messages.count_tokens(model="m",
                                                      messages=messages).input_tokens
        # Marked for caching: what was read is reported as stored, as Anthropic does.
        assert used.input_tokens == 0
        reads.append(used.cache_read_input_tokens)
        prompts.append(prompt)
        messages[-1]["content"][0].pop("cache_control")
        messages.append({"role": "assistant", "content": answer.content[0].text})
    # Each turn read the previous turn's prompt and answer from the cache.
    assert reads[1] >= prompts[0] and reads[2] >= prompts[1]
    assert reads[0] < reads[1] < reads[2]
