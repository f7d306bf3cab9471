"""`llm-gateway front` without a network: grouping the gateways' models into backends,
the merged model list, quoting, and the HAProxy configuration (`haproxy -c` accepts
every shape the command writes)."""

from __future__ import annotations

import runpy
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.__main__ import main as gateway_main
from gateway.front.cli import listen_address, notes, parse_args
from gateway.front.haproxy import MAX_BODY, MAX_MAXCONN, MAX_TIMEOUT, FrontSettings, render, word
from gateway.front.topology import Gateway, Served, backends, merged_models

EXAMPLE = Path(__file__).resolve().parents[1] / "example.cfg.lua"


def entry(name: str, alias_of: str | None = None, context: int = 2048) -> dict[str, Any]:
    return {"id": name, "object": "model", "context_length": context, "meta": {"alias_of": alias_of}}


def gateway(host: str, *names: str | tuple[str, str], maxconn: int = 256, context: int = 2048) -> Gateway:
    """A gateway on host:7777; a name, or (alias, model)."""
    served = []
    for name in names:
        alias, model = name if isinstance(name, tuple) else (name, name)
        served.append(Served(alias, model, entry(alias, None if alias == model else model, context)))
    return Gateway(f"http://{host}:7777", host, 7777, tuple(served), maxconn)


A = gateway("10.0.0.1", "llama", ("llama-chat", "llama"), "embed")
B = gateway("10.0.0.2", "llama", ("llama-chat", "llama"), "coder", maxconn=64)


def test_a_model_and_its_aliases_share_one_backend_with_every_gateway_serving_them() -> None:
    routes = backends([A, B])
    assert [(r.name, r.names, [g.host for g in r.gateways]) for r in routes] == [
        ("model_llama", ("llama", "llama-chat"), ["10.0.0.1", "10.0.0.2"]),
        ("model_embed", ("embed",), ["10.0.0.1"]),
        ("model_coder", ("coder",), ["10.0.0.2"]),
    ]


def test_an_alias_only_some_gateways_know_goes_to_those_alone() -> None:
    only_a = gateway("10.0.0.1", "llama", ("chat", "llama"))
    b = gateway("10.0.0.2", "llama")
    routes = backends([only_a, b])
    assert [(r.name, r.names, len(r.gateways)) for r in routes] == [
        ("model_llama", ("llama",), 2),
        ("model_chat", ("chat",), 1),
    ]


def test_backend_names_are_safe_for_haproxy_and_unique() -> None:
    odd = gateway("10.0.0.1", "org/model a", "org_model_a", "org/model_a")
    names = [r.name for r in backends([odd])]
    assert names == ["model_org_model_a", "model_org_model_a_2", "model_org_model_a_3"]


def test_the_merged_model_list_names_each_model_once_with_the_smallest_context() -> None:
    small = gateway("10.0.0.1", "llama", context=4096)
    large = gateway("10.0.0.2", "llama", "coder", context=32768)
    merged = merged_models([large, small])
    assert merged["object"] == "list"
    assert [(m["id"], m["context_length"]) for m in merged["data"]] == [("llama", 4096), ("coder", 32768)]


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("tiny", "tiny"),
        ("org/model:7b", "org/model:7b"),
        ("a b#c", "'a b#c'"),
        ("it's", '"it\'s"'),
        ('a"$\\b', "'a\"$\\b'"),
        ("x'\n", '"x\'\\x0a"'),
    ],
)
def test_words_are_quoted_when_they_need_it(text: str, written: str) -> None:
    assert word(text) == written


def test_the_config_routes_by_model_balances_and_limits_per_gateway() -> None:
    text = render([A, B], FrontSettings())
    assert (
        "    acl model_llama var(txn.model) -m str -- llama\n"
        "    acl model_llama var(txn.model) -m str -- llama-chat\n"
    ) in text
    assert "    use_backend model_llama if model_llama\n" in text
    assert "    default_backend gateways\n" in text
    assert "    server 10.0.0.2:7777 10.0.0.2:7777 check maxconn 64\n" in text
    assert "    server 10.0.0.2:7777 10.0.0.2:7777 track gateways/10.0.0.2:7777 maxconn 64\n" in text
    assert text.count("balance leastconn") == 4  # every gateway, and each of 3 models
    assert "option http-buffer-request" in text and "compression" not in text.replace("no `compression`", "")
    assert "tune.bufsize 114688" in text  # 96 KiB of body and room for headers


def test_sticky_hashes_the_header_consistently() -> None:
    text = render([A, B], FrontSettings(sticky="X-Session-Id"))
    assert text.count("    balance hdr(X-Session-Id)\n    hash-type consistent\n") == 3


def test_a_sticky_header_that_would_need_quoting_is_refused() -> None:
    with pytest.raises(ValueError, match="not a header name"):
        FrontSettings(sticky="X(y)")


@pytest.mark.parametrize(
    ("text", "address"),
    [("0.0.0.0:8080", ("0.0.0.0", 8080)), ("[::]:8080", ("::", 8080)), (":80", ("", 80))],
)
def test_listen_addresses(text: str, address: tuple[str, int]) -> None:
    assert listen_address(text) == address


@pytest.mark.parametrize("text", ["8080", "localhost:8080", "1.2.3.4:0", "1.2.3.4:70000", "[::1]"])
def test_bad_listen_addresses_are_refused(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--gateway", "http://h:1", "--listen", text])
    assert "not ip:port" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--gateway", "https://h:7777"],
        ["--gateway", "http://h:7777/v1"],
        ["--gateway", "http://h:7777", "--gateway", "http://h:7777/"],
        ["--gateway", "http://h:1", "--sticky", "a b"],
        ["--gateway", "http://h:1", "--api-key-env", "NO_SUCH_VARIABLE_HERE"],
        ["--listen", "1.2.3.4:80"],
    ],
)
def test_bad_command_lines_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2


@pytest.mark.parametrize(
    "url",
    [
        "http://h:7777\n",
        "http://h\t:7777",
        "http://h:7777/\r\n",
        "http://h:7777/\x00",
        "http://h:7777#x",
        "http://h:7777?",
        "http://u:p@h:7777",
        "http://[fe80::1%25lo]:7777",
        'http://a"b:7777',
        "http://hôst:7777",
    ],
)
def test_gateway_urls_that_are_not_just_a_host_and_port_are_refused(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--gateway", url])
    assert (
        exited.value.code == 2 and "argument --gateway: not a gateway's base URL" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", str(MAX_TIMEOUT + 1)),  # HAProxy's timers end at 2147483647 ms
        ("--max-body", "0"),
        ("--max-body", str(MAX_BODY + 1)),  # tune.bufsize must stay below 256 MB
        ("--max-body", str(256 * 1024 * 1024)),
        ("--maxconn", str(MAX_MAXCONN + 1)),  # HAProxy reads a larger one wrapped around
        ("--listen", "[fe80::1%lo]:8080"),  # HAProxy does not read IPv6 zones
    ],
)
def test_values_haproxy_would_refuse_or_misread_are_refused(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--gateway", "http://h:1", option, value])
    assert exited.value.code == 2 and f"argument {option}: " in capsys.readouterr().err


def test_settings_beyond_haproxys_limits_are_refused() -> None:
    for settings in ({"timeout": MAX_TIMEOUT + 1}, {"max_body": MAX_BODY + 1}, {"max_body": 0}):
        with pytest.raises(ValueError):
            FrontSettings(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("", "is empty"),
        ("sk-1\n", "holds characters"),
        ("sk-\t1", "holds characters"),
        ("ключ", "holds characters"),
    ],
)
def test_a_key_that_is_empty_or_cannot_be_sent_is_refused(
    value: str, said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FRONT_KEY", value)
    with pytest.raises(SystemExit) as exited:
        parse_args(["--gateway", "http://h:1", "--api-key-env", "FRONT_KEY"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"--api-key-env: the environment variable FRONT_KEY {said}" in err


ODD = gateway("10.0.0.3", 'it\'s a "model" #1', "модель", ("$HOME", "модель"), "x\ty")
# Words HAProxy reads as flags or syntax where a pattern is expected.
FLAGS = gateway("10.0.0.5", "-i", ("-f", "-i"), "--", "}", "{", "-m", "-n", "if", "!", "||", "or", "-u")
# One model with 60 names: HAProxy reads at most 64 words a line.
MANY = gateway("10.0.0.6", "many", *((f"many-{i}", "many") for i in range(59)))
SHAPES = {
    "one gateway": ([A], FrontSettings()),
    "shared model": ([A, B], FrontSettings()),
    "sticky": ([A, B], FrontSettings(sticky="X-Session-Id")),
    "every address": ([A, B], FrontSettings(listen=(("", 8080),))),
    "ipv6 and ipv4": ([A], FrontSettings(listen=(("::", 8080), ("127.0.0.1", 8081)))),
    "odd model names": ([A, ODD], FrontSettings()),
    "names that look like flags": ([A, FLAGS], FrontSettings()),
    "a model with 60 names": ([A, MANY], FrontSettings()),
    "no models": ([gateway("10.0.0.4")], FrontSettings()),
    "host names": ([gateway("gpu-a.example"), gateway("gpu-b.example", "llama")], FrontSettings()),
    "large bodies": ([A, B], FrontSettings(max_body=64 * 1024 * 1024, timeout=3600)),
    "the largest values": (
        [A, gateway("10.0.0.7", "llama", maxconn=MAX_MAXCONN)],
        FrontSettings(max_body=MAX_BODY, timeout=MAX_TIMEOUT),
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_haproxy_accepts_every_config_shape(shape: str, haproxy_binary: str, tmp_path: Path) -> None:
    gateways, settings = SHAPES[shape]
    path = tmp_path / "haproxy.cfg"
    path.write_text(render(gateways, settings, "llm-gateway front --gateway http://10.0.0.1:7777"))
    checked = subprocess.run([haproxy_binary, "-c", "-f", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Warnings only for host names that do not resolve here (such servers start down).
    warnings = [line for line in checked.stderr.splitlines() if "WARNING" in line]
    assert all("could not resolve address" in line for line in warnings), warnings


def test_the_command_line_in_the_header_stays_one_comment_line() -> None:
    command = "llm-gateway front --api-key-env 'K\n    bind 127.0.0.1:1\n'"  # a variable's name may hold one
    text = render([A], FrontSettings(), command)
    assert "#   llm-gateway front --api-key-env 'K\\n    bind 127.0.0.1:1\\n' > haproxy.cfg.new\n" in text
    assert text.count("\n    bind ") == 1  # the one --listen writes


def test_notes_name_what_will_not_work_as_well_as_it_could() -> None:
    quick = Gateway("http://10.0.0.5:7777", "10.0.0.5", 7777, gateway("x", "модель").names, 8, 0.0)
    found = notes([A, quick])
    assert len(found) == 2
    assert "'модель' is not ASCII" in found[0] and "as UTF-8, not as \\u escapes" in found[0]
    assert found[1].startswith("http://10.0.0.5:7777 has shutdown_delay 0s; HAProxy needs up to 1.25s")


def test_a_model_with_different_largest_contexts_on_its_gateways_is_warned_about() -> None:
    small = gateway("10.0.0.1", "llama", ("llama-chat", "llama"), "embed", context=4096)
    large = gateway("10.0.0.2", "llama", ("llama-chat", "llama"), context=32768)
    same = gateway("10.0.0.3", "embed", context=4096)
    assert notes([small, large, same]) == [
        "the model 'llama' has different largest contexts on its gateways "
        "(http://10.0.0.1:7777: 4096, http://10.0.0.2:7777: 32768): HAProxy sends a request to "
        "any of them, so a prompt over 4096 tokens fails with 400 on some and not on others"
    ]


def test_front_is_a_subcommand_beside_the_flat_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        gateway_main(["front", "--help"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("usage: llm-gateway front")
    assert gateway_main(["--check-config", str(EXAMPLE)]) == 0
    assert "example.cfg.lua: ok" in capsys.readouterr().out


def test_the_worked_example_is_what_the_command_writes_and_haproxy_accepts_it(haproxy_binary: str) -> None:
    folder = EXAMPLE.parent / "contrib" / "haproxy"
    written = runpy.run_path(str(folder / "example.py"))["example"]()
    assert (folder / "haproxy.cfg").read_text() == written, "run: python contrib/haproxy/example.py"
    checked = subprocess.run([haproxy_binary, "-c", "-f", str(folder / "haproxy.cfg")], capture_output=True)
    assert checked.returncode == 0, checked.stderr
