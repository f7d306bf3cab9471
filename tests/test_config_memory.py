"""The config's memory keys: server.max_engines, server.memory_budget, a model's or a
variant's memory, keep_loaded, the KV cache types and --mmproj; and the checks at load
that the models can run under the budget."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.engine.footprint import ENGINE_OVERHEAD, estimate
from tests.test_config import CLI, EXAMPLE, load, load_error, write

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def model(name: str = "a", extra: str = "", variants: str = "{ context = 1024 }") -> str:
    return f'{{ name = "{name}", {extra} variants = {{ {variants} }} }}'


def cfg(*models: str, server: str = "") -> str:
    return f"server = {{ {server} }}\nmodels = {{ {', '.join(models)} }}\n"


def tiny(
    models: dict[str, Path], name: str = "a", extra: str = "", variants: str = "{ context = 1024 }"
) -> str:
    """A model whose variants are estimated from the demo model's GGUF."""
    return model(name, f'args = {{ "-m", "{models["tiny"]}" }}, {extra}', variants)


# Good keys, and defaults -------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, f"models = {{ {model()} }}")
    server, m = config.server, config.models[0]
    assert (server.max_engines, server.memory_budget, server.memory_budget_source) == (1, None, "")
    assert m.keep_loaded is False
    v = m.variants[0]
    assert (v.memory, v.mmproj_file, v.cache_type_k, v.cache_type_v) == (None, None, "f16", "f16")


def test_the_example_keeps_both_demo_models_resident_without_a_budget() -> None:
    config = load_config(EXAMPLE)
    assert (config.server.max_engines, config.server.memory_budget) == (2, None)
    assert [m.keep_loaded for m in config.models] == [False, False]
    assert [(v.key, v.cache_type_k) for v in config.models[0].variants] == [
        ("tiny@512", "f16"),
        ("tiny@2048", "f16"),
        ("tiny@8192", "q8_0"),
    ]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ('"20GiB"', 20 * GiB),
        ('"512MiB"', 512 * MiB),
        ('"1.5GiB"', GiB + GiB // 2),
        ('"800MB"', 800 * 10**6),
        ('"3KB"', 3000),
        ('"2GB"', 2 * 10**9),
        ('"1TB"', 10**12),
        ('"64KiB"', 64 * KiB),
        ('"1TiB"', TiB),
        ('"0.5KiB"', 512),
        ('"1024B"', 1024),
        ('" 20 gib "', 20 * GiB),  # units in any case, spaces around
        ('"4096"', 4096),
        ("4096", 4096),
        ("8 * 1024 ^ 3", 8 * GiB),  # computed in Lua: a float with an integer value
    ],
)
def test_sizes(tmp_path: Path, text: str, size: int) -> None:
    """One parser for every size key: the budget, a model's memory, a variant's memory,
    and max_body_bytes."""
    a = model(extra=f"memory = {text},")
    b = model("b", variants=f"{{ context = 8, memory = {text} }}")
    config = load(tmp_path, cfg(a, b, server=f"memory_budget = {text}, max_body_bytes = {text}"))
    assert config.server.memory_budget == size
    assert config.server.memory_budget_source == "config"
    assert config.server.max_body_bytes == size
    assert config.models[0].variants[0].memory == size
    assert config.models[1].variants[0].memory == size


def test_max_engines_and_keep_loaded(tmp_path: Path) -> None:
    a, b = model(extra="keep_loaded = true,"), model("b", extra="keep_loaded = false,")
    config = load(tmp_path, cfg(a, b, model("c"), server="max_engines = 3"))
    assert config.server.max_engines == 3
    assert [m.keep_loaded for m in config.models] == [True, False, False]


def test_a_variant_inherits_its_models_memory(tmp_path: Path) -> None:
    variants = '{ context = 8 }, { context = 16, memory = "1GiB" }'
    config = load(tmp_path, cfg(model(extra='memory = "6GiB",', variants=variants)))
    assert [v.memory for v in config.models[0].variants] == [6 * GiB, GiB]


def test_auto_is_the_machines_memory_less_ten_percent(tmp_path: Path) -> None:
    server = load(
        tmp_path, f'server = {{ memory_budget = "auto" }} models = {{ {model(extra="memory = 1,")} }}'
    ).server
    assert server.memory_budget is not None and server.memory_budget > 0
    assert server.memory_budget_source.startswith("auto: ")
    assert server.memory_budget_source.endswith(" less 10%")


def test_cache_types_and_projector_from_args_and_env(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        models = { {
          name = "a",
          args = { "-m", "models/x.gguf", "--mmproj", "models/proj.gguf", "-ctk", "q8_0" },
          env = { LLAMA_ARG_CACHE_TYPE_V = "q4_0" },
          variants = {
            { context = 8 },
            { context = 16,
              args = { "--cache-type-k", "bf16", "--cache-type-v", "iq4_nl", "-mm", "/abs/p.gguf" } },
          },
        } }
        """,
    )
    v8, v16 = config.models[0].variants
    assert (v8.cache_type_k, v8.cache_type_v) == ("q8_0", "q4_0")
    assert v8.mmproj_file == str(tmp_path / "models" / "proj.gguf")
    assert (v16.cache_type_k, v16.cache_type_v) == ("bf16", "iq4_nl")  # the args win over env
    assert v16.mmproj_file == "/abs/p.gguf"


def test_variants_that_fit_the_budget_load(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    need = estimate(load(tmp_path, f"models = {{ {tiny(tiny_models)} }}").models[0].variants[0])
    assert need is not None and need.total > ENGINE_OVERHEAD
    a, b = tiny(tiny_models, extra="keep_loaded = true,"), model("b", extra='memory = "1KiB",')
    budget = need.total + 1024  # a (kept loaded) and b (1 KiB) together, exactly
    config = load(tmp_path, cfg(a, b, server=f"memory_budget = {budget}, max_engines = 2"))
    assert config.server.memory_budget == budget


def test_a_model_that_never_fits_beside_the_keep_loaded_ones_is_refused(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    need = estimate(load(tmp_path, f"models = {{ {tiny(tiny_models)} }}").models[0].variants[0])
    assert need is not None
    a, b = tiny(tiny_models, extra="keep_loaded = true,"), model("b", extra='memory = "1KiB",')
    text = cfg(a, b, server=f"memory_budget = {need.total + 1023}, max_engines = 2")
    message = load_error(write(tmp_path, text))
    assert "models[2] b@1024" in message and "never fits beside the keep_loaded models" in message
    assert "models[1] a@1024" in message and "server.memory_budget" in message


# Refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "shown"),
    [
        ("server = { max_engines = 0 } models = { MODEL }", "server.max_engines", "(got 0)"),
        ("server = { max_engines = 2^63 } models = { MODEL }", "server.max_engines", "at most 1024"),
        ("server = { max_engines = 1.5 } models = { MODEL }", "server.max_engines", "(got 1.5)"),
        ('server = { max_engines = "2" } models = { MODEL }', "server.max_engines", '(got "2")'),
        ('server = { memory_budget = "lots" } models = { MODEL }', "server.memory_budget", '"lots"'),
        ("server = { memory_budget = -5 } models = { MODEL }", "server.memory_budget", "(got -5)"),
        ('server = { memory_budget = "-5GiB" } models = { MODEL }', "server.memory_budget", '"-5GiB"'),
        ('server = { memory_budget = "0" } models = { MODEL }', "server.memory_budget", '"0"'),
        ("server = { memory_budget = 0 } models = { MODEL }", "server.memory_budget", "(got 0)"),
        ('server = { memory_budget = "20G" } models = { MODEL }', "server.memory_budget", '"20G"'),
        ('server = { memory_budget = "GiB" } models = { MODEL }', "server.memory_budget", '"GiB"'),
        ('server = { memory_budget = "1e9" } models = { MODEL }', "server.memory_budget", '"1e9"'),
        ("server = { memory_budget = 0.5 } models = { MODEL }", "server.memory_budget", "(got 0.5)"),
        ("server = { memory_budget = true } models = { MODEL }", "server.memory_budget", "(got true)"),
        ("server = { memory_budget = {} } models = { MODEL }", "server.memory_budget", "(got a table)"),
        ('server = { memory_budget = "9999999TiB" } models = { MODEL }', "server.memory_budget", "too large"),
        ('server = { max_body_bytes = "big" } models = { MODEL }', "server.max_body_bytes", '"big"'),
        (
            'models = { { name = "a", memory = "lots", variants = { { context = 8 } } } }',
            "models[1].memory",
            '"lots"',
        ),
        (
            'models = { { name = "a", memory = "auto", variants = { { context = 8 } } } }',
            "models[1].memory",
            '"auto"',
        ),
        (
            'models = { { name = "a", variants = { { context = 8 }, { context = 9, memory = -1 } } } }',
            "models[1].variants[2].memory",
            "(got -1)",
        ),
        (
            'models = { { name = "a", keep_loaded = "yes", variants = { { context = 8 } } } }',
            "models[1].keep_loaded",
            '"yes"',
        ),
        (
            'models = { { name = "a", variants = { { context = 8, keep_loaded = true } } } }',
            "models[1].variants[1]",
            'unknown key "keep_loaded"',
        ),
        (
            'models = { { name = "a", args = { "-ctk", "Q8_0" }, variants = { { context = 8 } } } }',
            "models[1].args[2]",
            '"Q8_0"',
        ),
        (
            'models = { { name = "a", variants = { { context = 8, args = { "-ctv", "q3_k" } } } } }',
            "models[1].variants[1].args[2]",
            '"q3_k"',
        ),
        (
            'models = { { name = "a", env = { LLAMA_ARG_CACHE_TYPE_K = "f8" }, variants = { { context = 8 } } } }',  # noqa: E501
            "models[1].env.LLAMA_ARG_CACHE_TYPE_K",
            '"f8"',
        ),
        (
            'models = { { name = "a", args = { "-ctk=q8_0" }, variants = { { context = 8 } } } }',
            "models[1].args[1]",
            "no -ctk=value form",
        ),
        (
            'models = { { name = "a", args = { "-mm" }, variants = { { context = 8 } } } }',
            "models[1].args[1]",
            "-mm",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, text: str, key: str, shown: str) -> None:
    message = load_error(write(tmp_path, text.replace("MODEL", model())))
    assert message.startswith(f"{tmp_path / 'cfg.lua'}: {key}: "), message
    assert shown in message, message


def test_a_variant_larger_than_the_budget(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    message = load_error(
        write(
            tmp_path,
            f"""
            server = {{ memory_budget = "20MiB" }}
            models = {{ {model("b", extra='memory = "1MiB",')},
                        {tiny(tiny_models, variants="{ context = 512 }, { context = 4096 }")} }}
            """,
        )
    )
    assert message.startswith(f"{tmp_path / 'cfg.lua'}: models[2].variants[1] (a@512): needs 32."), message
    assert "weights 0.4 MiB + KV cache 0.1 MiB + overhead 32.0 MiB" in message
    assert "more than server.memory_budget 20.0 MiB (config)" in message


def test_a_declared_variant_larger_than_the_budget(tmp_path: Path) -> None:
    variants = '{ context = 8 }, { context = 9, memory = "9GiB" }'
    text = cfg(model(extra='memory = "6GiB",', variants=variants), server='memory_budget = "8GiB"')
    message = load_error(write(tmp_path, text))
    assert message == (
        f"{tmp_path / 'cfg.lua'}: models[1].variants[2] (a@9): needs 9.0 GiB (declared), "
        "more than server.memory_budget 8.0 GiB (config)"
    )


def test_variant_numbers_follow_the_file_not_the_context_order(tmp_path: Path) -> None:
    variants = '{ context = 64, memory = "2GiB" }, { context = 8, memory = "1MiB" }'
    message = load_error(write(tmp_path, cfg(model(variants=variants), server='memory_budget = "1GiB"')))
    assert ": models[1].variants[1] (a@64): needs 2.0 GiB" in message


def test_keep_loaded_models_over_the_budget_together(tmp_path: Path) -> None:
    a = model("a", 'keep_loaded = true, memory = "6GiB",')
    b = model(
        "b", "keep_loaded = true,", '{ context = 8, memory = "5GiB" }, { context = 4, memory = "4.5GiB" }'
    )
    c = model("c", 'memory = "9GiB",')
    message = load_error(write(tmp_path, cfg(a, b, c, server='memory_budget = "10GiB", max_engines = 3')))
    assert message == (
        f"{tmp_path / 'cfg.lua'}: the keep_loaded models need 10.5 GiB together even in their "
        "smallest variants, more than server.memory_budget 10.0 GiB (config): "
        "models[1] a@1024 needs 6.0 GiB (declared); models[2] b@4 needs 4.5 GiB (declared)"
    )


def test_more_keep_loaded_models_than_engines(tmp_path: Path) -> None:
    message = load_error(
        write(
            tmp_path,
            f"""
            server = {{ max_engines = 2 }}
            models = {{ {model("a", "keep_loaded = true,")}, {model("b")},
                        {model("c", "keep_loaded = true,")}, {model("d", "keep_loaded = true,")} }}
            """,
        )
    )
    assert message == (
        f"{tmp_path / 'cfg.lua'}: server.max_engines: 3 models have keep_loaded = true "
        "(models[1] (a), models[3] (c), models[4] (d)), "
        "but only 2 engine(s) may run at once (max_engines = 2)"
    )


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ("", "its args name no -m model file"),
        ('"-m", "missing.gguf"', "missing.gguf is not a readable GGUF file"),
        ('"-m", "cfg.lua"', "cfg.lua is not a readable GGUF file"),
    ],
)
def test_under_a_budget_an_unknown_footprint_must_be_declared(tmp_path: Path, args: str, reason: str) -> None:
    text = f'server = {{ memory_budget = "8GiB" }} models = {{ {model(extra=f"args = {{ {args} }},")} }}'
    message = load_error(write(tmp_path, text))
    assert message.startswith(
        f"{tmp_path / 'cfg.lua'}: models[1].variants[1] (a@1024): its memory cannot be estimated"
    )
    assert reason in message and 'memory = "8GiB"' in message, message
    # Declared, it loads; without a budget nothing is estimated.
    load(tmp_path, text.replace("args =", 'memory = "1GiB", args ='))
    load(tmp_path, f"models = {{ {model(extra=f'args = {{ {args} }},')} }}")


def test_check_config_runs_the_memory_checks(tmp_path: Path) -> None:
    path = write(
        tmp_path, f'server = {{ memory_budget = "1GiB" }} models = {{ {model(extra="memory = 2e9,")} }}'
    )
    result = subprocess.run(
        [str(CLI), "--check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result
    assert "models[1].variants[1] (a@1024): needs 1.9 GiB (declared)" in result.stdout + result.stderr


def test_a_model_file_given_by_the_engine_environment_is_estimated(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    env_model = model("a", f'env = {{ LLAMA_ARG_MODEL = "{tiny_models["tiny"]}" }},')
    config = load(tmp_path, cfg(env_model, server='memory_budget = "1GiB"'))
    variant = config.models[0].variants[0]
    assert variant.model_file == str(tiny_models["tiny"])
    estimated = estimate(variant)
    assert estimated is not None and estimated.weights == tiny_models["tiny"].stat().st_size
