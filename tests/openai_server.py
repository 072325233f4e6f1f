"""A small OpenAI-compatible chat server for the tests, standard library only, on 127.0.0.1, with fault injection.

    python tests/openai_server.py --port 8123 --model fake-user                       # a healthy endpoint
    python tests/openai_server.py --port 8123 --faults '{"500": 0.2, "stall": 0.05}'  # one that fails

    srv = OpenAIServer(faults={"429": 0.3}, seed=0)     # in a test: a thread in this process
    srv.url                                            # http://127.0.0.1:<port>/v1
    srv.counts                                         # requests answered per outcome ("ok", "500", ...)
    srv.close()

It serves `GET /v1/models` (the served model name) and `POST /v1/chat/completions`. Each completion request
draws one outcome from `faults` ({kind: probability}, the rest "ok") with a seeded generator, so a run is
repeatable request by request (not across threads' arrival order). The kinds, each a way real endpoints fail:
  500            HTTP 500 with a short body
  429            HTTP 429 with a Retry-After header (`retry_after` seconds)
  stall          no reply for `stall_s` seconds (longer than the client's timeout), then the connection closes
  drop           the connection is closed without any reply
  malformed      HTTP 200 whose body is not JSON
  empty_choices  HTTP 200 with "choices": []
  bad_format     HTTP 200, a well-formed reply whose text breaks every role's expected format
With `echo_auth`, the bodies of 500 and 429 replies quote the request's Authorization header, as some providers'
error replies quote the key they were sent: a test can then check that the key never reaches a log.
With `latency` (lo, hi), each reply first waits a time drawn uniformly between lo and hi seconds (a slow model;
its own seeded generator). An "ok" reply comes from `reply_fn(body) -> str` (default: `generic_reply`, text that every simulated-user role
of the gyms can parse: a Yes/No/Maybe word first, then one JSON object). With `tools` in the request and no
`tool_reply`, an ok reply is plain text (an agent that never calls the tool).
"""
import argparse
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("500", "429", "stall", "drop", "malformed", "empty_choices", "bad_format")


def generic_reply(body: dict) -> str:
    """A reply each gym role can read: the yes/no roles take the first word, the JSON roles the object (keys a
    role does not know are ignored; a role that needs more, such as a per-point score list, falls back)."""
    return ('Maybe. {"correct": false, "covered": [], "task_related": false, "response": "I am not convinced.", '
            '"stance": "Strongly Agree", "thought": "nothing new"}')


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops simultaneous connects, which then retry after 1 s


class OpenAIServer:
    def __init__(self, port: int = 0, model: str = "fake-user", faults: dict | None = None, seed: int = 0,
                 reply_fn=generic_reply, tool_reply: dict | None = None, retry_after: float = 1.0,
                 stall_s: float = 30.0, echo_auth: bool = False, latency: tuple | None = None,
                 finish_reason: str = "stop"):
        unknown = set(faults or {}) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULTS}")
        if sum((faults or {}).values()) > 1:
            raise ValueError(f"fault probabilities sum to more than 1: {faults}")
        self.model, self.faults, self.reply_fn, self.tool_reply = model, dict(faults or {}), reply_fn, tool_reply
        self.retry_after, self.stall_s, self.echo_auth = retry_after, stall_s, echo_auth
        self.finish_reason = finish_reason  # of every ok reply; "length" plays a reply max_tokens cut
        self.rng, self.latency, self.latency_rng = random.Random(seed), latency, random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {}
        self.bodies = []
        self.in_flight = self.max_in_flight = 0
        self.closing = threading.Event()
        self.httpd = _HTTPServer(("127.0.0.1", port), self._handler())
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def draw(self) -> str:
        with self.lock:
            x, acc = self.rng.random(), 0.0
            for kind, p in self.faults.items():
                acc += p
                if x < acc:
                    return kind
            return "ok"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY, as real servers (uvicorn) set it: the body, written after the headers, would otherwise
            # wait for the client's delayed ACK of the headers (Nagle's algorithm), 40 ms on Linux loopback
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def send(self, status: int, payload: bytes, headers: dict | None = None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self.send(200, json.dumps({"object": "list", "data": [{"id": server.model, "object": "model"}]}).encode())
                else:
                    self.send(404, b'{"error": "not found"}')

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.send(404, b'{"error": "not found"}')
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                kind = server.draw()
                with server.lock:
                    server.counts[kind] = server.counts.get(kind, 0) + 1
                    server.bodies.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.latency:
                        with server.lock:
                            wait = server.latency_rng.uniform(*server.latency)
                        time.sleep(wait)
                    self.answer(kind, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def error(self, text: str) -> bytes:
                quoted = {"authorization": self.headers.get("Authorization", "")} if server.echo_auth else {}
                return json.dumps({"error": text, **quoted}).encode()

            def answer(self, kind: str, body: dict):
                if kind == "500":
                    self.send(500, self.error("internal server error"))
                elif kind == "429":
                    self.send(429, self.error("rate limited"), {"Retry-After": str(server.retry_after)})
                elif kind == "stall":
                    server.closing.wait(server.stall_s)
                    self.close_connection = True
                elif kind == "drop":
                    self.close_connection = True  # return without a status line: the client sees a dropped connection
                elif kind == "malformed":
                    self.send(200, b'{"choices": [{"message": ')
                elif kind == "empty_choices":
                    self.send(200, json.dumps({"id": "x", "choices": []}).encode())
                else:
                    if kind == "bad_format":
                        message = {"role": "assistant", "content": "I would rather talk about something else."}
                    elif body.get("tools") and server.tool_reply is not None:
                        message = {"role": "assistant", "content": "", "tool_calls": [
                            {"id": "call_1", "type": "function",
                             "function": {"name": "interact_with_env", "arguments": json.dumps(server.tool_reply)}}]}
                    else:
                        message = {"role": "assistant", "content": server.reply_fn(body)}
                    reply = {"id": "x", "object": "chat.completion", "model": server.model,
                             "choices": [{"index": 0, "message": message, "finish_reason": server.finish_reason}]}
                    self.send(200, json.dumps(reply).encode())

        return Handler

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default="fake-user")
    p.add_argument("--faults", default="{}", help='JSON {kind: probability}, kinds: ' + ", ".join(FAULTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stall_s", type=float, default=30.0)
    p.add_argument("--echo_auth", action="store_true", help="error replies quote the Authorization header")
    args = p.parse_args()
    srv = OpenAIServer(args.port, args.model, json.loads(args.faults), args.seed, stall_s=args.stall_s,
                       echo_auth=args.echo_auth)
    print(f"serving {args.model} on {srv.url}", flush=True)
    try:
        srv.thread.join()
    except KeyboardInterrupt:
        srv.close()


if __name__ == "__main__":
    main()
