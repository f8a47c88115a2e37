"""Nothing a client does holds the server: a client that hangs up frees its rows within a step, a stop refuses the
queue at once and gives rows in flight a grace period, bodies over the limit are refused before they are buffered,
slow senders are cut off; the OpenAI routes refuse chats they cannot answer, and the spec and server agree."""
import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
from test_serve import AUTH, KEY, make_adapter

from peft_t5.bank import AdapterBank
from peft_t5.serve.app import ServeSettings, create_app, running


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapters") / "jokes", "jokes", 1)


def serve(adapter, **options):
    bank = AdapterBank.load("tiny", {"jokes": adapter})
    return running(create_app(bank, ServeSettings(compile=False, api_key=KEY, **options)))


def gauge(url: str, name: str, headers: dict = AUTH) -> float:
    text = httpx.get(url + "/metrics", headers=headers).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> socket.socket:
    """A request written to a fresh socket; the caller reads, or closes, it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {KEY}",
             *(f"{k}: {v}" for k, v in (headers or {"Content-Length": len(body), "Content-Type": "application/json"}).items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def test_clients_that_hang_up_free_their_rows_within_a_step(adapter):
    long = json.dumps({"adapter": "jokes", "inputs": ["why?", "what?", "who?", "how?"], "max_new_tokens": 4000,
                       "min_new_tokens": 3990}).encode()
    app = create_app(AdapterBank.load("tiny", {"jokes": adapter}), ServeSettings(compile=False,
        api_key=KEY, max_new_tokens=4000, max_request_tokens=20_000, request_timeout=600))
    engine = app.state.engine
    with running(app) as url:
        with engine.holding():
            sockets = [raw_request(url, "POST", "/v1/generate", long) for _ in range(32)]
            engine.wait_until(lambda: engine.waiting_rows == 128)
        engine.wait_until(lambda: engine.active_rows == 64)  # admitted over a few steps, as the encoding budget allows
        assert gauge(url, "peft_t5_active_rows") == 64 and gauge(url, "peft_t5_queued_rows") == 64
        with engine.holding():  # no step runs from here until the server has seen every client leave
            for sock in sockets:
                sock.close()
            engine.wait_until(lambda: all(row.request.over for row in engine.active) and
                              all(request.over for request in engine.waiting))
            steps = gauge(url, "peft_t5_step_seconds_count")
        engine.wait_until(lambda: engine.active_rows == engine.waiting_rows == 0)
        assert gauge(url, "peft_t5_active_rows") == gauge(url, "peft_t5_queued_rows") == 0
        assert gauge(url, "peft_t5_step_seconds_count") <= steps + 1  # they left at the next step, at the latest
        fresh = httpx.post(url + "/v1/generate", json={"adapter": "jokes", "inputs": ["hi"], "max_new_tokens": 4},
                           headers=AUTH, timeout=300)
        assert fresh.status_code == 200
        assert 'peft_t5_errors_total{route="/v1/generate",status="499"}' in httpx.get(url + "/metrics", headers=AUTH).text


@pytest.mark.slow
def test_sigterm_refuses_the_queue_at_once_and_exits_after_the_grace_period(adapter, tmp_path):
    # rows that ask for 100,000 tokens cannot end by themselves within the 2 s grace period on any machine: what ends
    # them is the server's stop
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from peft_t5.cli import main; sys.exit(main())", "serve", "--adapter",
         f"jokes={adapter}", "--model", "tiny", "--port", "0", "--max_new_tokens", "100000", "--max_request_tokens",
         "400000", "--max_rows", "8", "--shutdown_timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = next(m.group(1) for line in server.stdout if (m := re.search(r"serving .* on (http://\S+)/ ", line)))
        body = {"adapter": "jokes", "inputs": ["why?"] * 4, "max_new_tokens": 100000, "min_new_tokens": 99990}
        deadline = time.monotonic() + 300  # a bound on a hang

        def rows_reach(active: int, queued: int) -> None:
            while (gauge(url, "peft_t5_active_rows", headers={}), gauge(url, "peft_t5_queued_rows", headers={})) != \
                    (active, queued):
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.05)  # polls the server's gauges

        with ThreadPoolExecutor(6) as pool:
            replies = []
            for active, queued in [(4, 0), (8, 0), (8, 4), (8, 8), (8, 12), (8, 16)]:  # one at a time: 2 decode, 4 wait
                replies.append(pool.submit(httpx.post, url + "/v1/generate", json=body, timeout=300))
                rows_reach(active, queued)
            server.send_signal(signal.SIGTERM)
            statuses = sorted(r.result().status_code for r in replies)
            server.wait(timeout=300)
        errors = [r.result().json()["error"] for r in replies]
        assert statuses == [503] * 6 and all(e.startswith("the server is stopping: ") for e in errors), errors
        assert sum("had not started" in e for e in errors) == 4 and sum("before this request finished" in e
                                                                       for e in errors) == 2, errors
        log = server.stdout.read()
        assert server.returncode == -signal.SIGTERM and "Traceback" not in log, log
    finally:
        server.kill()


def test_bodies_over_the_limit_are_refused_before_they_are_buffered(adapter):
    settings = dict(max_inputs=2, max_input_chars=1000)
    limit = ServeSettings(**settings).max_body_bytes
    with serve(adapter, **settings) as url:
        declared = raw_request(url, "POST", "/v1/generate", headers={"Content-Length": 100 * 2**20})
        reply = b"".join(iter(lambda: declared.recv(4096), b"")).decode()
        assert reply.startswith("HTTP/1.1 413") and f"at most {limit:,} bytes" in reply
        rss = psutil.Process().memory_info().rss

        def chunks():
            yield b'{"adapter": "jokes", "inputs": ["'
            for _ in range(100):
                yield b"x" * 2**20

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: httpx.post(url + "/v1/generate", content=chunks(), headers=AUTH,
                                                         timeout=60), range(4)))
        assert [r.status_code for r in replies] == [413] * 4 and "the request body: over" in replies[0].json()["error"]
        assert psutil.Process().memory_info().rss - rss < 50 * 2**20
        fitting = {"adapter": "jokes", "inputs": ["\U0001F600" * 1000] * 2, "max_new_tokens": 2}
        assert httpx.post(url + "/v1/generate", content=json.dumps(fitting),
                          headers={**AUTH, "Content-Type": "application/json"}).status_code == 200


def test_slow_senders_are_cut_off_after_the_read_timeout(adapter):
    """--read_timeout bounds the whole head, not each byte: a client that trickles a header that never ends, a byte
    every 0.25 s (each within the 1 s timeout), is cut off all the same."""
    with serve(adapter, read_timeout=1.0) as url:
        host, port = url.removeprefix("http://").split(":")
        slow_head = socket.create_connection((host, int(port)))
        slow_body = raw_request(url, "POST", "/v1/generate", b"{", {"Content-Length": 1000})
        silent = socket.create_connection((host, int(port)))
        closed = False
        for byte in b"POST /v1/generate HTTP/1.1\r\nX-Pad: " + b"a" * 1000:  # 4+ minutes of bytes, if never cut
            try:
                slow_head.sendall(bytes([byte]))
                if slow_head.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.25)  # the client's pace, not a synchronisation
        assert closed
        slow_body.settimeout(300)
        assert slow_body.recv(4096).decode().startswith("HTTP/1.1 408")
        silent.settimeout(300)
        assert silent.recv(1) == b""  # closed: a connection that never sends a head is cut off too


def test_a_chat_needs_a_user_message_and_known_roles(adapter):
    with serve(adapter) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.UnprocessableEntityError, match="no message with role 'user'"):
            client.chat.completions.create(model="jokes", messages=[{"role": "system", "content": "be brief"},
                                                                    {"role": "assistant", "content": "hello"}])
        with pytest.raises(openai.UnprocessableEntityError, match=r"messages\[0\]\.role: Input should be"):
            client.chat.completions.create(model="jokes", messages=[{"role": "wizard", "content": "hi"}])
        model = client.models.retrieve("jokes")
        assert (model.id, model.object, model.owned_by) == ("jokes", "model", "peft-t5")
        with pytest.raises(openai.NotFoundError, match="no adapter named 'nope'"):
            client.models.retrieve("nope")


def test_the_spec_says_what_401_and_unknown_methods_answer(adapter):
    with serve(adapter) as url:
        spec = httpx.get(url + "/openapi.json").json()
        for path in ("/", "/metrics"):
            unauthorized = httpx.get(url + path)
            media = unauthorized.headers["content-type"].split(";")[0]
            assert unauthorized.status_code == 401 and media in spec["paths"][path]["get"]["responses"]["401"]["content"]
        for path in ("/v1/generate", "/v1/adapters", "/metrics"):
            trace = httpx.request("TRACE", url + path)
            assert trace.status_code == 405 and trace.headers["allow"]
        assert httpx.get(url + "/nowhere").status_code == 404
        assert httpx.post(url + "/v1/generate", json={}).status_code == 401


def test_the_page_asks_for_no_favicon_and_gets_no_404(adapter):
    with serve(adapter) as url:
        page = httpx.get(url + "/", headers=AUTH).text
        assert '<link rel="icon" href="data:,">' in page
