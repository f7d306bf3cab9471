"""The prompt cache against real engines: a conversation keeps its KV cache across a
variant upgrade, a swap to another model and back, and a restart of the gateway; a
damaged file, a changed model file or other cache types cost the request nothing."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, metric, tiny_model_config, wait_until

TURN = "word " * 300  # 1500 bytes: about 1500 tokens on the demo model (one a byte)


def variants(*contexts: int, **variant_args: list[str]) -> list[dict[str, Any]]:
    return [
        {"context": c, **({"args": variant_args[f"c{c}"]} if f"c{c}" in variant_args else {})}
        for c in contexts
    ]


def models(tiny_models: dict[str, Path], **variant_args: list[str]) -> list[dict[str, Any]]:
    tiny, tiny_b = tiny_model_config(tiny_models, variants=variants(2048, 8192, **variant_args))
    return [tiny, tiny_b]


class Conversation:
    """A chat that grows turn by turn; each answer's timings are kept."""

    def __init__(self, gw: Gateway, model: str = "tiny") -> None:
        self.gw, self.model = gw, model
        self.messages: list[dict[str, str]] = []
        self.timings: list[dict[str, Any]] = []
        self.contexts: list[str] = []

    def say(self, text: str) -> dict[str, Any]:
        self.messages.append({"role": "user", "content": text})
        reply = self.gw.post(
            "/v1/chat/completions", {"model": self.model, "messages": self.messages, "max_tokens": 8}
        )
        assert reply.status == 200, reply.body
        answer = reply.json()
        self.messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        self.timings.append(answer["timings"])
        self.contexts.append(reply.headers["X-Gateway-Context"])
        return answer["timings"]

    @property
    def processed_before(self) -> int:
        """The prompt tokens of the turn before the last one."""
        timings = self.timings[-2]
        return int(timings["cache_n"]) + int(timings["prompt_n"])


def other_model(gw: Gateway) -> None:
    reply = gw.post(
        "/v1/chat/completions", {"model": "tiny-b", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert reply.status == 200, reply.body


def test_an_upgrade_keeps_the_conversations_cache(start_gateway, tiny_models) -> None:
    gw = start_gateway(models(tiny_models))
    talk = Conversation(gw)
    talk.say(TURN)
    upgraded = talk.say("more " * 400)  # too long for 2048: the 8192 variant starts
    assert talk.contexts == ["2048", "8192"]
    assert upgraded["cache_n"] >= 0.95 * talk.processed_before, talk.timings
    assert metric(gw, "llm_gateway_prompt_cache_restores_total", outcome="restored") == 1
    assert metric(gw, "llm_gateway_prompt_cache_tokens_restored_total", model="tiny") >= talk.processed_before
    cached = gw.state()["prompt_cache"]["tiny"]
    assert cached and cached[0]["tokens"] >= talk.processed_before
    log = gw.log()
    assert "prompt cache save tiny@2048" in log and "prompt cache restore tiny@8192" in log


def test_a_swap_to_another_model_and_back_keeps_the_cache(start_gateway, tiny_models) -> None:
    gw = start_gateway(models(tiny_models), max_engines=1)
    talk = Conversation(gw)
    talk.say(TURN)
    other_model(gw)  # tiny is stopped for tiny-b: its slots are saved
    back = talk.say("and again")
    assert back["cache_n"] >= 0.95 * talk.processed_before, talk.timings


def test_without_the_prompt_cache_an_upgrade_starts_empty(start_gateway, tiny_models) -> None:
    gw = start_gateway(models(tiny_models), prompt_cache=False)
    talk = Conversation(gw)
    talk.say(TURN)
    assert talk.say("more " * 400)["cache_n"] == 0
    assert gw.state()["prompt_cache"] == {}


def test_a_configured_folder_keeps_the_cache_across_a_restart(start_gateway, tiny_models, tmp_path) -> None:
    folder = tmp_path / "prompts"
    gw = start_gateway(models(tiny_models), prompt_cache={"dir": str(folder), "max_size": "64MiB"})
    talk = Conversation(gw)
    talk.say(TURN)
    assert gw.stop() == 0  # the shutdown stops the engine: its slots are saved
    assert list(folder.glob("*.bin")) and list(folder.glob("*.json"))
    again = start_gateway(models(tiny_models), prompt_cache={"dir": str(folder), "max_size": "64MiB"})
    talk.gw = again
    assert talk.say("after the restart")["cache_n"] >= 0.95 * talk.processed_before


def test_a_damaged_file_is_logged_and_the_request_runs_without_it(
    start_gateway, tiny_models, tmp_path
) -> None:
    folder = tmp_path / "prompts"
    gw = start_gateway(models(tiny_models), max_engines=1, prompt_cache={"dir": str(folder)})
    talk = Conversation(gw)
    talk.say(TURN)
    other_model(gw)
    wait_until(lambda: list(folder.glob("*.bin")))
    for saved in folder.glob("*.bin"):  # cut short, as a disk that filled up leaves it
        data = saved.read_bytes()
        saved.write_bytes(data[: len(data) * 3 // 5])
    back = talk.say("and again")
    assert back["cache_n"] == 0
    assert "restore into tiny@2048 failed" in gw.log()
    assert metric(gw, "llm_gateway_prompt_cache_restores_total", outcome="failed") == 1
    assert talk.say("one more")["prompt_n"] < talk.processed_before  # the engine itself is fine


def test_a_restore_refused_for_room_is_made_once_the_idle_slots_are_erased(
    start_gateway, tiny_models
) -> None:
    """Another chat's cells fill the unified cache of 512: llama-server refuses the saved
    one with the words it has for a damaged file. The gateway erases the idle slots and
    tries once more: the file was good."""
    gw = start_gateway(tiny_model_config(tiny_models, variants=[{"context": 512}]), max_engines=1)
    talk = Conversation(gw)
    talk.say("word " * 85)
    other_model(gw)  # its slots are saved
    Conversation(gw).say("other " * 74)
    back = talk.say("and again")
    assert talk.contexts == ["512"] * 2 and 400 < talk.processed_before < 512 - 40, talk.timings
    assert back["cache_n"] >= 0.95 * talk.processed_before, talk.timings
    assert metric(gw, "llm_gateway_prompt_cache_restores_total", outcome="restored") == 1
    assert metric(gw, "llm_gateway_prompt_cache_restores_total", outcome="failed") == 0


def test_token_ids_beyond_32_bits_are_left_to_the_engine(start_gateway, tiny_models) -> None:
    """No saved prompt can hold such an id: it matches none and the request goes on as it
    stands (it was a 500)."""
    gw = start_gateway(models(tiny_models), max_engines=1)
    Conversation(gw).say(TURN)
    other_model(gw)  # its slots are saved
    ids = [65] * 1600 + [2**40]  # as long as the saved prompt, so that it is compared
    reply = gw.post("/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 4})
    assert reply.status < 500, reply.body


def test_another_model_file_under_the_same_name_drops_the_cache(start_gateway, tiny_models) -> None:
    gw = start_gateway(models(tiny_models), max_engines=1)
    talk = Conversation(gw)
    talk.say(TURN)
    other_model(gw)
    reloaded = gw.config_path.read_text().replace(str(tiny_models["tiny"]), str(tiny_models["tiny-b"]), 1)
    gw.config_path.write_text(reloaded)
    gw.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reloaded" in gw.log())
    back = talk.say("and again")
    assert back["cache_n"] == 0
    assert "changed since it was saved" in gw.log()
    assert gw.state()["prompt_cache"] == {}


def test_state_lists_the_cached_conversations_per_model(start_gateway, tiny_models) -> None:
    gw = start_gateway(models(tiny_models), max_engines=1)
    Conversation(gw).say(TURN)
    other_model(gw)
    cached = gw.state()["prompt_cache"]
    assert list(cached) == ["tiny"]
    (entry,) = cached["tiny"]
    assert entry["tokens"] >= 1500 and entry["bytes"] > 0 and entry["cache_types"] == "f16/f16"
    json.dumps(cached)  # plain JSON


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--cache-type-k", "f32"], "saved with KV cache types f16/f16, this engine runs f32/f16"),
        # Positions encoded otherwise: the saved cache would give other logits.
        (
            ["--rope-scaling", "linear", "--rope-scale", "4"],
            'saved with engine args "", this engine runs "--rope-scaling linear --rope-scale 4"',
        ),
        # Two KV streams, where llama-server refuses a slot saved from one ("n_stream
        # mismatch"): trying would cost the file the other variants can use.
        (["-np", "2"], "saved from 1 KV cache stream(s), this engine has 2"),
    ],
)
def test_a_variant_with_another_kv_cache_is_not_restored_into(
    start_gateway, tiny_models, args: list[str], why: str
) -> None:
    gw = start_gateway(models(tiny_models, c8192=args))
    talk = Conversation(gw)
    talk.say(TURN)
    upgraded = talk.say("more " * 400)
    assert talk.contexts[-1] == "8192" and upgraded["cache_n"] == 0
    assert why in gw.log()
    assert metric(gw, "llm_gateway_prompt_cache_restores_total") == 0
    assert any(entry["tokens"] >= talk.processed_before for entry in gw.state()["prompt_cache"]["tiny"])


def test_args_that_leave_the_kv_cache_alone_do_not_stop_a_restore(start_gateway, tiny_models) -> None:
    gw = start_gateway(models(tiny_models, c8192=["-t", "2", "-np", "2", "-kvu", "--metrics", "-lv", "3"]))
    talk = Conversation(gw)
    talk.say(TURN)
    upgraded = talk.say("more " * 400)
    assert talk.contexts[-1] == "8192"
    assert upgraded["cache_n"] >= 0.95 * talk.processed_before, talk.timings
