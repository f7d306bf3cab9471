"""What a front tier (HAProxy) needs from each gateway, against the real engine: /health
answers 503 during server.shutdown_delay while requests are still served, and every
answer to a model request names the model that served it in X-Gateway-Model."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

from tests.conftest import Gateway, Response, tiny_model_config, wait_until

CHAT = [{"role": "user", "content": "hi"}]
DELAY = 3.0  # long enough for a request sent after the 503 to be answered within it


def chat(gateway: Gateway, model: str = "tiny", **extra: object) -> Response:
    return gateway.post("/v1/chat/completions", {"model": model, "messages": CHAT, "max_tokens": 4, **extra})


def health(gateway: Gateway) -> Response:
    return gateway.request("GET", "/health", timeout=5)


def test_health_answers_503_during_the_shutdown_delay_while_requests_are_served(
    start_gateway, tiny_models
) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), shutdown_delay=DELAY)
    assert chat(gateway).status == 200
    signalled = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    refused = wait_until(lambda: (r := health(gateway)).status == 503 and r, interval=0.01)
    assert refused.json() == {"status": "shutting down"}
    answer = chat(gateway)  # a request that arrives during the delay
    answered = time.monotonic() - signalled
    assert answer.status == 200, answer.body
    assert answered < DELAY  # it really came during the delay
    assert answer.headers["Connection"] == "close"  # no keep-alive to a gateway on its way out
    assert gateway.process.wait(30) == 0
    assert time.monotonic() - signalled >= DELAY


def test_sigint_stops_without_the_delay(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), shutdown_delay=600)
    assert health(gateway).status == 200
    gateway.process.send_signal(signal.SIGINT)
    assert gateway.process.wait(20) == 0


def test_errors_after_the_model_is_known_name_it_and_others_do_not(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models))
    refused = chat(gateway, "tiny-chat", max_tokens=0)
    assert refused.status == 400 and refused.headers["X-Gateway-Model"] == "tiny"
    unknown = chat(gateway, "nope")
    assert unknown.status == 404 and "X-Gateway-Model" not in unknown.headers
    assert "X-Gateway-Model" not in health(gateway).headers


def test_a_stream_that_waits_for_a_swap_names_its_model(start_gateway, tiny_models) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models))  # max_engines 1: tiny-b waits for tiny
    holder = threading.Thread(target=chat, args=(gateway,), kwargs={"max_tokens": 3000})
    holder.start()
    wait_until(lambda: gateway.state()["in_flight"] == 1, interval=0.002)
    body = json.dumps({"model": "tiny-b", "messages": CHAT, "max_tokens": 3, "stream": True}).encode()
    req = urllib.request.Request(
        gateway.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["X-Gateway-Model"] == "tiny-b"
        assert resp.read().decode().startswith(": waiting for model tiny-b\n\n")
    holder.join(30)


def test_a_second_signal_cuts_the_delay_short(start_gateway, tiny_models) -> None:
    """An operator who sends SIGTERM again (or Ctrl-C) does not wait out the delay."""
    gateway = start_gateway(tiny_model_config(tiny_models), shutdown_delay=600)
    gateway.process.send_signal(signal.SIGTERM)
    wait_until(lambda: health(gateway).status == 503, interval=0.01)
    gateway.process.send_signal(signal.SIGINT)
    assert gateway.process.wait(20) == 0
    assert "a second signal ends the delay early" in gateway.log()


def test_requests_queued_at_the_shutdown_are_served(start_gateway, tiny_models) -> None:
    """Requests waiting in the queue for the running engine when the gateway stops are
    served during its drain, not refused."""
    gateway = start_gateway(tiny_model_config(tiny_models, variants=[{"context": 2048}, {"context": 8192}]))
    answers: list[Response] = []
    body = {"max_tokens": 300, "ignore_eos": True}
    threads = [threading.Thread(target=lambda: answers.append(chat(gateway, **body))) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: gateway.state()["queued"]["count"] >= 2, interval=0.002)
    gateway.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    assert [a.status for a in answers] == [200] * 8, [a.body for a in answers if a.status != 200]
    assert gateway.process.wait(30) == 0
