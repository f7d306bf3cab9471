"""The dashboard in a real browser (Debian's headless Chromium, driven by Selenium) against
a real gateway and engine: it follows requests, swaps and unloads live, its buttons work,
it asks for a key, and it renders at a desktop's and a phone's size.

Screenshots go to test-artifacts/dashboard/ (git-ignored)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.conftest import Gateway, tiny_model_config, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "dashboard"
DESKTOP = (1280, 800)
PHONE = (390, 844)
LIVE = 1.0  # seconds within which the page shows what happened


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "Chromium is missing: run `make setup` (it installs Debian's chromium and chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size={},{}".format(*DESKTOP))
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


class Page:
    """The dashboard as a user sees it."""

    def __init__(self, driver: WebDriver, gateway: Gateway) -> None:
        self.driver = driver
        self.gateway = gateway
        driver.get_log("browser")  # what earlier tests left
        driver.get_log("performance")

    def open(self) -> None:
        self.driver.get(self.gateway.url + "/")
        assert self.driver.current_url == self.gateway.url + "/gateway/ui"

    def find(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def one(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def shown(self, css: str) -> bool:
        return any(element.is_displayed() for element in self.find(css))

    def card(self, model: str) -> WebElement:
        return self.one(f'article.card[data-model="{model}"]')

    def state(self, model: str) -> str | None:
        cards = self.find(f'article.card[data-model="{model}"]')
        return cards[0].get_attribute("data-state") if cards else None

    def fact(self, model: str, name: str) -> str:
        return self.card(model).find_element(By.CSS_SELECTOR, f'[data-fact="{name}"]').text

    def row(self, request_id: str) -> WebElement | None:
        rows = self.find(f'#activity tr[data-request-id="{request_id}"]')
        return rows[0] if rows else None

    def watch_states(self, model: str) -> None:
        """Record every state the card shows from now on (in window.seen[model])."""
        self.driver.execute_script(
            """const [model] = arguments;
            const card = document.querySelector(`article.card[data-model="${model}"]`);
            window.seen = window.seen || {};
            window.seen[model] = [];
            new MutationObserver(() => window.seen[model].push(card.dataset.state))
              .observe(card, {attributes: true, attributeFilter: ["data-state"]});""",
            model,
        )

    def seen(self, model: str) -> list[str]:
        return self.driver.execute_script("return window.seen[arguments[0]]", model)

    def problems(self) -> list[str]:
        """Console errors, and requests that failed or got an error status."""
        errors = [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message["method"] == "Network.responseReceived" and params["response"]["status"] >= 400:
                errors.append(f"{params['response']['status']} {params['response']['url']}")
            elif message["method"] == "Network.loadingFailed" and not params.get("canceled"):
                errors.append(f"failed: {params.get('errorText')}")
        return errors

    def screenshot(self, name: str, size: tuple[int, int]) -> None:
        """At a device's size (a phone's is emulated, as its browser lays pages out)."""
        width, height = size
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        try:
            wait_until(lambda: self.driver.execute_script("return window.innerWidth") == width)
            overflow = self.driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"the page is {overflow}px wider than a {width}px screen"
            for card in self.find("article.card"):
                assert card.is_displayed() and card.rect["width"] <= width
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
        finally:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


class Relay:
    """A TCP relay in front of the gateway whose connections a test can cut, as a network
    would; while cut, it refuses new ones. It notes the Last-Event-ID requests carry."""

    def __init__(self, target: str) -> None:
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: list[socket.socket] = []
        self.refusing = False
        self.resumed_from: list[str] = []

    def __enter__(self) -> Relay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.cut()

    def cut(self) -> None:
        self.refusing = True
        for connection in self.open:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        self.open.clear()

    def mend(self) -> None:
        self.refusing = False

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener was closed
            while True:
                client, _ = self.listener.accept()
                if self.refusing:
                    client.close()
                    continue
                upstream = socket.create_connection(self.target)
                self.open += [client, upstream]
                threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, request: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if request and (found := re.search(rb"(?im)^last-event-id: *(\d+)", data)):
                    self.resumed_from.append(found[1].decode())
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def chat(gateway: Gateway, model: str, content: str = "hello") -> str:
    """A request sent as a client would (urllib); its request id."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    response = gateway.post("/v1/chat/completions", body)
    assert response.status == 200, response.body
    return response.headers["X-Request-Id"]


def within(seconds: float, check: Callable[[], Any]) -> float:
    """How long `check` took to come true (it must within `seconds`)."""
    start = time.monotonic()
    wait_until(check, timeout=seconds)
    return time.monotonic() - start


def test_the_page_follows_requests_swaps_and_unloads_live(
    browser: WebDriver, start_gateway: Callable[..., Gateway], tiny_models: dict[str, Path]
) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models))  # one engine at a time: swaps
    page = Page(browser, gateway)
    page.open()
    wait_until(lambda: page.state("tiny") == page.state("tiny-b") == "idle")
    assert page.one("#connection").text == "live"
    page.watch_states("tiny")

    first = chat(gateway, "tiny")
    row_after = within(LIVE, lambda: page.row(first))
    within(LIVE, lambda: page.state("tiny") == "ready")
    seen = page.seen("tiny")
    assert "starting" in seen and "ready" in seen[seen.index("starting") :], seen
    engine = gateway.engine("tiny")
    assert page.fact("tiny", "pid") == str(engine["pid"])
    assert page.fact("tiny", "variant") == "context 512"
    assert "estimated" in page.fact("tiny", "memory") and page.fact("tiny", "uptime")[0].isdigit()
    row = page.row(first)
    assert row is not None and "waited" in (row.get_attribute("class") or "")
    assert [cell.text for cell in row.find_elements(By.TAG_NAME, "td")][1:5] == [
        "tiny",
        "tiny",
        "chat/completions",
        "200",
    ]

    swapped = chat(gateway, "tiny-b")
    within(
        LIVE, lambda: page.row(swapped) and page.state("tiny-b") == "ready" and page.state("tiny") == "idle"
    )
    assert page.fact("tiny", "swap").startswith("drain ") and "stop " in page.fact("tiny", "swap")
    assert page.fact("tiny-b", "swap").startswith("start ")
    assert page.shown("#selections tr.eviction"), "the eviction of tiny for tiny-b is listed"

    page.card("tiny-b").find_element(By.CSS_SELECTOR, "button.unload").click()
    wait_until(lambda: page.state("tiny-b") == "idle" and gateway.engine("tiny-b")["state"] == "idle")
    wait_until(lambda: "unloaded" in page.one("#notice").text)

    page.card("tiny").find_element(By.CSS_SELECTOR, "select.variant-choice option[value='2048']").click()
    page.card("tiny").find_element(By.CSS_SELECTOR, "button.load").click()
    wait_until(lambda: page.state("tiny") == "ready" and page.fact("tiny", "variant") == "context 2048")
    assert gateway.engine("tiny")["variant"]["context"] == 2048

    assert page.problems() == []
    assert len({card.rect["y"] for card in page.find("article.card")}) == 1, "the cards stand side by side"
    page.screenshot("desktop", DESKTOP)
    page.screenshot("phone", PHONE)
    print(f"activity row shown {row_after * 1000:.0f} ms after the answer")


def test_a_dropped_connection_resumes_where_it_left_without_a_reload(
    browser: WebDriver, start_gateway: Callable[..., Gateway], tiny_models: dict[str, Path]
) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models))
    with Relay(gateway.url) as relay:  # the network between the browser and the gateway
        page = Page(browser, Gateway(relay.url, gateway.process, gateway.config_path, gateway.log_path))
        page.open()
        wait_until(lambda: page.state("tiny") == "idle" and page.one("#connection").text == "live")
        browser.execute_script("window.notReloaded = true")
        relay.cut()
        wait_until(lambda: page.one("#connection").text == "reconnecting")
        missed = chat(gateway, "tiny")  # while the page cannot hear of it
        relay.mend()
        wait_until(lambda: page.row(missed) and page.state("tiny") == "ready")
    assert browser.execute_script("return window.notReloaded") is True
    assert relay.resumed_from, "the page reconnected with the last event id it saw"


def test_the_page_asks_for_the_key_and_refuses_a_wrong_one(
    browser: WebDriver, start_gateway: Callable[..., Gateway], tiny_models: dict[str, Path]
) -> None:
    gateway = start_gateway(tiny_model_config(tiny_models), admin_key="sk-admin-1", api_keys=["sk-team"])
    page = Page(browser, gateway)
    page.open()
    wait_until(lambda: page.shown("#key-form"))
    assert not page.shown("#dashboard") and not page.shown("#key-error")

    # A wrong key, an API key (it does not open /gateway/*), and one a header cannot carry
    # (a zero-width space: fetch refuses it; the page had kept retrying it for good).
    for wrong in ("sk-wrong", "sk-team", "sk-admin-1\u200b"):
        page.one("#key").send_keys(wrong)
        page.one("#key-form button").click()
        wait_until(lambda: page.shown("#key-error") and page.shown("#key-form"))
        assert "refused" in page.one("#key-error").text
        assert browser.execute_script("return sessionStorage.length") == 0

    page.one("#key").send_keys("sk-admin-1")
    page.one("#key-form button").click()
    wait_until(lambda: page.state("tiny") == "idle" and page.one("#connection").text == "live")
    assert not page.shown("#key-form")
    assert browser.execute_script("return sessionStorage.length") == 1
    assert "sk-" not in browser.current_url and "sk-admin-1" not in gateway.log()
    refused = page.problems()  # the tries with the wrong keys, and nothing else
    assert refused and all("401" in problem and "/gateway/events" in problem for problem in refused), refused
