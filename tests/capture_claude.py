"""Record what the real Claude Code CLI sends, for the request-level tests.

    python tests/capture_claude.py OUT_DIR -- claude -p "hi" --bare --tools ""
    python tests/capture_claude.py OUT_DIR --call 'ToolSearch={"query": "select:WebFetch"}' \
        --call 'WebFetch={"url": "https://example.com", "prompt": "title"}' -- claude -p "hi"

Starts a minimal logging server on a free loopback port that answers every
Messages request with a fixed short reply (streamed or not), counts tokens as
10 and 404s the rest; runs the given command with ANTHROPIC_BASE_URL pointing
at it; writes each request (method, path, headers, JSON body) to
OUT_DIR/NN-<path>.json. The auth token is replaced by a placeholder.

Each ``--call NAME=JSON`` scripts one tool call: the next Messages request
whose ``tools`` hold NAME is answered with that ``tool_use`` instead of text,
so a round trip (the CLI runs the call and sends its result) is recorded.

An interactive session needs a terminal; tmux gives it one:

    tmux new-session -d -s cap 'python tests/capture_claude.py OUT_DIR -- claude "hi"'
    tmux send-keys -t cap "a second turn" Enter    # then "/exit" Enter
"""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPLY = "Captured."


def sse(name, data):
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def stream_reply(model, block):
    message = {"id": "msg_capture", "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 10, "output_tokens": 0}}
    return b"".join([
        sse("message_start", {"type": "message_start", "message": message}),
        *block_events(block),
        sse("message_delta", {"type": "message_delta",
                              "delta": {"stop_reason": stop_reason(block),
                                        "stop_sequence": None},
                              "usage": {"output_tokens": 2}}),
        sse("message_stop", {"type": "message_stop"}),
    ])


def block_events(block):
    if block["type"] == "text":
        start, delta = {**block, "text": ""}, {"type": "text_delta", "text": block["text"]}
    else:
        start = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
    return [sse("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": start}),
            sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": delta}),
            sse("content_block_stop", {"type": "content_block_stop", "index": 0})]


def stop_reason(block):
    return "tool_use" if block["type"] == "tool_use" else "end_turn"


class Recorder(BaseHTTPRequestHandler):
    out_dir = None
    calls = []  # scripted (name, input), used in order
    count = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def record(self, body):
        with Recorder.lock:
            Recorder.count += 1
            n = Recorder.count
        headers = {k.lower(): ("<token>" if k.lower() in ("authorization", "x-api-key") else v)
                   for k, v in self.headers.items()}
        name = self.path.split("?")[0].strip("/").replace("/", "_") or "root"
        entry = {"method": self.command, "path": self.path, "headers": headers, "body": body}
        (self.out_dir / f"{n:02d}-{name}.json").write_text(json.dumps(entry, indent=1))

    def send(self, status, payload, content_type="application/json"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def do_HEAD(self):
        self.record(None)
        self.send(200, b"")

    def do_GET(self):
        self.record(None)
        self.send(404, b'{"type":"error","error":{"type":"not_found_error","message":"no"}}')

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.loads(raw) if raw else None
        self.record(body)
        path = self.path.split("?")[0]
        if path == "/v1/messages/count_tokens":
            return self.send(200, b'{"input_tokens": 10}')
        if path != "/v1/messages":
            return self.send(404, b'{"type":"error","error":{"type":"not_found_error","message":"no"}}')
        block = self.answer(body)
        if body.get("stream"):
            return self.send(200, stream_reply(body.get("model"), block),
                             "text/event-stream")
        reply = {"id": "msg_capture", "type": "message", "role": "assistant",
                 "model": body.get("model"), "content": [block],
                 "stop_reason": stop_reason(block), "stop_sequence": None,
                 "usage": {"input_tokens": 10, "output_tokens": 2}}
        self.send(200, json.dumps(reply).encode())


    def answer(self, body):
        """The next scripted call if this request offers its tool, else text."""
        names = {t.get("name") for t in body.get("tools") or ()}
        with Recorder.lock:
            if Recorder.calls and Recorder.calls[0][0] in names:
                name, arguments = Recorder.calls.pop(0)
                return {"type": "tool_use", "id": f"toolu_capture{Recorder.count:02d}",
                        "name": name, "input": arguments}
        return {"type": "text", "text": REPLY}


def main():
    split = sys.argv.index("--")
    options, command = sys.argv[1:split], sys.argv[split + 1:]
    out_dir = Path(options.pop(0))
    while options:
        flag, value = options.pop(0), options.pop(0)
        if flag != "--call":
            sys.exit(f"unknown option {flag}")
        name, _, arguments = value.partition("=")
        Recorder.calls.append((name, json.loads(arguments)))
    out_dir.mkdir(parents=True, exist_ok=True)
    Recorder.out_dir = out_dir
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{server.server_port}",
           "ANTHROPIC_AUTH_TOKEN": "capture-token"}
    result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, timeout=300)
    server.shutdown()
    print(f"exit {result.returncode}; {Recorder.count} requests in {out_dir}")


if __name__ == "__main__":
    main()
