"""Config decoding (strict, with paths in every error) and the `fastpath-gateway` CLI commands
that read configs, run as real subprocesses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import BUILD_PROFILE, __version__
from gateway import config as config_mod
from gateway.config import Config, ConfigError, ProviderKind

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "gateway.yaml"
CLI_TIMEOUT_S = 60.0

PROVIDERS = """\
providers:
  - name: p1
    base_url: http://127.0.0.1:9100/v1
"""
MODELS = """\
models:
  - name: m1
    provider: p1
"""
MINIMAL = PROVIDERS + MODELS


def parse(text: str) -> Config:
    return config_mod.parse(text, "<test>")


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


# ---- valid configs ----------------------------------------------------------------------------
def test_minimal_config_gets_defaults() -> None:
    cfg = parse(MINIMAL)
    assert [p.name for p in cfg.providers] == ["p1"]
    assert cfg.providers[0].kind is ProviderKind.OPENAI
    assert cfg.providers[0].api_key is None
    assert [(m.name, m.provider, m.upstream_model) for m in cfg.models] == [("m1", "p1", None)]
    assert cfg.server == config_mod.ServerConfig()
    assert cfg.server.max_json_depth == 64


def test_embedded_default_config_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTPATH_LOCAL_MOCK_API_KEY", raising=False)
    monkeypatch.delenv("FASTPATH_LOCAL_TRITON_GRPC", raising=False)
    monkeypatch.setenv("FASTPATH_GATEWAY_SALT", "a-local-test-salt-0123456789")
    cfg = config_mod.load(None)
    assert cfg.auth.enabled and cfg.auth.store is not None
    assert cfg.auth.store.kind is config_mod.StoreKind.SQLITE
    assert {(m.name, m.upstream_model) for m in cfg.models} == {
        ("local-llm", "ensemble"),
        ("local-echo", "mock-echo"),
        ("local-slow", "mock-slow"),
        ("local-embed", "minilm_embed"),
        ("local-embed-mock", "text-embedding-3-small"),
    }
    triton, provider = cfg.providers
    assert (triton.kind, triton.base_url) == (config_mod.ProviderKind.TRITON, "grpc://127.0.0.1:9101")
    assert [(g.name, g.kind) for g in cfg.guards] == [
        ("injection_rules", config_mod.GuardKind.RULES),
        ("prompt_guard", config_mod.GuardKind.TRITON),
    ]
    assert provider.base_url == "http://127.0.0.1:9100/v1"
    assert provider.api_key == ""  # `${FASTPATH_LOCAL_MOCK_API_KEY:-}` with the variable unset
    assert cfg == parse(config_mod.default_text())


def test_example_config_parses_with_its_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    cfg = config_mod.load(EXAMPLE)
    by_name = {p.name: p for p in cfg.providers}
    assert by_name["openai"].api_key == "sk-from-env"
    assert by_name["vllm"].headers == {"X-Team": "ml-platform"}
    models = {m.name: m for m in cfg.models}
    assert models["llama-3.1-8b"].upstream_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert models["llama-3.1-8b"].encoding == "cl100k_base"
    trt = models["llama-3.1-8b-trt"]
    assert by_name[trt.provider].kind is config_mod.ProviderKind.TRITON
    assert trt.triton is not None and trt.triton.stop == ["<|eot_id|>"]
    assert [g.name for g in cfg.guards] == ["injection_rules", "prompt_guard", "toxicity"]
    assert cfg.guards[2].check is config_mod.GuardCheck.BOTH and cfg.guards[2].sentences
    assert cfg.guards[0].patterns == {"internal_ticket": r"\bINC-\d{6}\b"}
    assert cfg.server.host == "0.0.0.0"


def test_example_config_without_its_env_names_path_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        config_mod.load(EXAMPLE)
    assert "$.providers[0].api_key" in str(info.value)
    assert "OPENAI_API_KEY" in str(info.value)


# ---- strictness: unknown keys and wrong types name their path -----------------------------------
@pytest.mark.parametrize(
    "text,path,key",
    [
        pytest.param(MINIMAL + "bogus: 1\n", "`$`", "bogus", id="top-level"),
        pytest.param("server:\n  prot: 8080\n" + MINIMAL, "$.server", "prot", id="server"),
        pytest.param(
            MINIMAL.replace("    base_url:", "    api_base: x\n    base_url:"),
            "$.providers[0]",
            "api_base",
            id="provider",
        ),
        pytest.param(MINIMAL + "    upstream: x\n", "$.models[0]", "upstream", id="model"),
    ],
)
def test_unknown_key_names_path_and_key(text: str, path: str, key: str) -> None:
    msg = config_error(text)
    assert path in msg
    assert f"`{key}`" in msg
    assert "unknown" in msg


@pytest.mark.parametrize(
    "text,path",
    [
        pytest.param("server:\n  port: '8080'\n" + MINIMAL, "$.server.port", id="port-string"),
        pytest.param("server:\n  port: true\n" + MINIMAL, "$.server.port", id="port-bool"),
        pytest.param("server:\n  workers: 1.5\n" + MINIMAL, "$.server.workers", id="workers-float"),
        pytest.param("server: 5\n" + MINIMAL, "$.server", id="server-scalar"),
        pytest.param("providers: {}\n" + MODELS, "$.providers", id="providers-mapping"),
        pytest.param(
            MINIMAL.replace("    base_url:", "    kind: bogus\n    base_url:"),
            "$.providers[0].kind",
            id="unknown-kind",
        ),
        pytest.param(
            MINIMAL.replace("    base_url:", "    headers: {X-A: 1}\n    base_url:"),
            "$.providers[0].headers",
            id="header-value-int",
        ),
        pytest.param(
            MINIMAL.replace("    base_url:", "    first_byte_timeout_ms: 1s\n    base_url:"),
            "$.providers[0].first_byte_timeout_ms",
            id="duration-with-unit",
        ),
        pytest.param(MINIMAL + "    upstream_model: 7\n", "$.models[0].upstream_model", id="model-int"),
        pytest.param(PROVIDERS + "models:\n  - provider: p1\n", "$.models[0]", id="model-name-missing"),
        pytest.param(MODELS, "providers", id="providers-missing"),
    ],
)
def test_wrong_type_names_path(text: str, path: str) -> None:
    assert path in config_error(text)


# ---- ${VAR} interpolation ------------------------------------------------------------------------
def with_key(value: str) -> str:
    return MINIMAL.replace("    base_url:", f'    api_key: "{value}"\n    base_url:')


def test_env_var_is_interpolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPG_TEST_KEY", "sk-abc")
    assert parse(with_key("${FPG_TEST_KEY}")).providers[0].api_key == "sk-abc"
    assert parse(with_key("Bearer-${FPG_TEST_KEY}-x")).providers[0].api_key == "Bearer-sk-abc-x"


def test_env_var_default_applies_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FPG_TEST_KEY", raising=False)
    assert parse(with_key("${FPG_TEST_KEY:-fallback}")).providers[0].api_key == "fallback"
    assert parse(with_key("${FPG_TEST_KEY:-}")).providers[0].api_key == ""
    monkeypatch.setenv("FPG_TEST_KEY", "set")
    assert parse(with_key("${FPG_TEST_KEY:-fallback}")).providers[0].api_key == "set"


def test_env_var_in_nested_list_and_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPG_TEST_TEAM", "ml")
    monkeypatch.setenv("FPG_TEST_HOST", "10.0.0.7")
    text = MINIMAL.replace("http://127.0.0.1:9100/v1", "http://${FPG_TEST_HOST}:8000/v1").replace(
        "    base_url:", "    headers:\n      X-Team: ${FPG_TEST_TEAM}\n    base_url:"
    )
    provider = parse(text).providers[0]
    assert provider.base_url == "http://10.0.0.7:8000/v1"
    assert provider.headers == {"X-Team": "ml"}


def test_env_value_is_not_interpolated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPG_TEST_KEY", "${HOME}")
    assert parse(with_key("${FPG_TEST_KEY}")).providers[0].api_key == "${HOME}"


def test_missing_env_var_names_path_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FPG_TEST_MISSING", raising=False)
    msg = config_error(with_key("${FPG_TEST_MISSING}"))
    assert "$.providers[0].api_key" in msg
    assert "FPG_TEST_MISSING" in msg


def test_missing_env_var_in_server_names_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FPG_TEST_MISSING", raising=False)
    msg = config_error("server:\n  host: ${FPG_TEST_MISSING}\n" + MINIMAL)
    assert "$.server.host" in msg and "FPG_TEST_MISSING" in msg


# ---- cross-field validation ----------------------------------------------------------------------
def test_duplicate_provider_name() -> None:
    text = PROVIDERS + "  - name: p1\n    base_url: http://127.0.0.1:9200/v1\n" + MODELS
    msg = config_error(text)
    assert "$.providers[1].name" in msg and "p1" in msg


def test_duplicate_model_name() -> None:
    msg = config_error(MINIMAL + "  - name: m1\n    provider: p1\n")
    assert "$.models[1].name" in msg and "m1" in msg


def test_model_with_unknown_provider() -> None:
    msg = config_error(PROVIDERS + "models:\n  - name: m1\n    provider: nope\n")
    assert "$.models[0].provider" in msg and "nope" in msg and "p1" in msg


def test_unknown_encoding() -> None:
    msg = config_error(MINIMAL + "    encoding: gpt2\n")
    assert "$.models[0].encoding" in msg and "gpt2" in msg


@pytest.mark.parametrize(
    "text,path", [("providers: []\n" + MODELS, "$.providers"), (PROVIDERS + "models: []\n", "$.models")]
)
def test_empty_providers_or_models(text: str, path: str) -> None:
    assert path in config_error(text)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("127.0.0.1:9100/v1", id="no-scheme"),
        pytest.param("//127.0.0.1:9100/v1", id="scheme-relative"),
        pytest.param("ftp://127.0.0.1/v1", id="ftp"),
        pytest.param("file:///etc/passwd", id="file"),
        pytest.param("http://", id="no-host"),
        pytest.param("http://127.0.0.1:9100/v1?key=x", id="query"),
        pytest.param("http://127.0.0.1:9100/v1#frag", id="fragment"),
        pytest.param("http://127.0.0.1:99999/v1", id="port-out-of-range"),
        pytest.param("http://127.0.0.1:abc/v1", id="port-not-a-number"),
    ],
)
def test_bad_base_url(url: str) -> None:
    msg = config_error(MINIMAL.replace("http://127.0.0.1:9100/v1", url))
    assert "$.providers[0].base_url" in msg


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9100/v1", "https://api.example.com/v1", "http://[::1]:8000"]
)
def test_good_base_url(url: str) -> None:
    assert parse(MINIMAL.replace("http://127.0.0.1:9100/v1", url)).providers[0].base_url == url


def test_bad_static_header_name() -> None:
    text = MINIMAL.replace("    base_url:", "    headers: {'X Team': v}\n    base_url:")
    assert "$.providers[0].headers" in config_error(text)


@pytest.mark.parametrize(
    "section,field,value",
    [
        ("server", "max_body_bytes", 0),
        ("server", "max_body_bytes", -1),
        ("server", "max_header_bytes", 0),
        ("server", "max_headers", 0),
        ("server", "max_json_depth", 0),
        ("server", "body_read_timeout_ms", -5),
        ("server", "header_read_timeout_ms", 0),
        ("server", "max_stream_duration_ms", 0),
        ("server", "stream_ping_interval_ms", 0),
        ("server", "backlog", 0),
        ("server", "workers", -1),
        ("server", "shutdown_grace_ms", -1),
        ("server", "port", -1),
        ("server", "port", 65536),
        ("provider", "connect_timeout_ms", 0),
        ("provider", "first_byte_timeout_ms", -1),
        ("provider", "idle_timeout_ms", 0),
        ("provider", "total_timeout_ms", 0),
        ("provider", "max_response_bytes", 0),
        ("provider", "max_idle_connections", -1),
    ],
)
def test_non_positive_limits(section: str, field: str, value: int) -> None:
    if section == "server":
        text, path = f"server:\n  {field}: {value}\n" + MINIMAL, f"$.server.{field}"
    else:
        text = MINIMAL.replace("    base_url:", f"    {field}: {value}\n    base_url:")
        path = f"$.providers[0].{field}"
    msg = config_error(text)
    assert path in msg and str(value) in msg


@pytest.mark.parametrize(
    "text", ["server:\n  workers: 0\n" + MINIMAL, "server:\n  shutdown_grace_ms: 0\n" + MINIMAL]
)
def test_zero_allowed_where_it_means_something(text: str) -> None:
    parse(text)


def test_zero_idle_connections_allowed() -> None:
    parse(MINIMAL.replace("    base_url:", "    max_idle_connections: 0\n    base_url:"))


# ---- not a config at all -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        pytest.param("server: [\n", id="unclosed-flow"),
        pytest.param("server:\n  port: 1\n port: 2\n", id="bad-indent"),
        pytest.param("a: b: c\n", id="mapping-in-scalar"),
        pytest.param("\t- tab\n", id="tab"),
    ],
)
def test_invalid_yaml(text: str) -> None:
    msg = config_error(text)
    assert "<test>" in msg and "YAML" in msg


@pytest.mark.parametrize(
    "text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n", "42\n", "null\n"]
)
def test_top_level_not_a_mapping(text: str) -> None:
    msg = config_error(text)
    assert "<test>" in msg and "mapping" in msg


def test_duplicate_yaml_key_is_an_error() -> None:
    msg = config_error("server:\n  port: 1\n  port: 2\n" + MINIMAL)
    assert "duplicate" in msg and "port" in msg and "line 3" in msg


def test_yaml_tags_are_not_executed() -> None:
    msg = config_error("server: !!python/object/apply:os.system ['true']\n" + MINIMAL)
    assert "YAML" in msg


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        config_mod.load(missing)
    assert str(missing) in str(info.value) and "cannot read" in str(info.value)


def test_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"server:\n  host: caf\xe9\n" + MINIMAL.encode())
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    assert str(path) in str(info.value) and "UTF-8" in str(info.value)


# ---- the CLI -------------------------------------------------------------------------------------
def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("fastpath-gateway")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


def run_cli(*args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI; `env` adds variables to this process's environment (None: unset it)."""
    full_env = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    return subprocess.run(
        [*cli_command(), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=full_env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_clean_failure(proc: subprocess.CompletedProcess[str], code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip()


def test_cli_check_config_good(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(MINIMAL + "  - name: m2\n    provider: p1\n    upstream_model: real-m2\n")
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stdout
    assert "m1 -> p1:m1" in proc.stdout
    assert "m2 -> p1:real-m2" in proc.stdout


def test_cli_check_config_example() -> None:
    proc = run_cli("check-config", str(EXAMPLE), env={"OPENAI_API_KEY": "sk-test"})
    assert proc.returncode == 0, proc.stderr
    assert "gpt-4o-mini" in proc.stdout and "llama-3.1-8b" in proc.stdout
    unset = run_cli("check-config", str(EXAMPLE), env={"OPENAI_API_KEY": None})
    assert_clean_failure(unset)
    assert "OPENAI_API_KEY" in unset.stderr and "$.providers[0].api_key" in unset.stderr


@pytest.mark.parametrize(
    "text,needle",
    [
        pytest.param("server:\n  prot: 1\n" + MINIMAL, "$.server", id="unknown-key"),
        pytest.param("server:\n  port: x\n" + MINIMAL, "$.server.port", id="wrong-type"),
        pytest.param(with_key("${FPG_TEST_SURELY_UNSET}"), "FPG_TEST_SURELY_UNSET", id="missing-env"),
        pytest.param("server: [\n", "YAML", id="invalid-yaml"),
        pytest.param(
            PROVIDERS + "models:\n  - name: m\n    provider: zz\n", "$.models[0].provider", id="bad-ref"
        ),
    ],
)
def test_cli_check_config_bad(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run_cli("check-config", str(path), env={"FPG_TEST_SURELY_UNSET": None})
    assert_clean_failure(proc)
    assert needle in proc.stderr
    assert str(path) in proc.stderr


def test_cli_check_config_nonexistent(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist.yaml"
    proc = run_cli("check-config", str(missing))
    assert_clean_failure(proc)
    assert str(missing) in proc.stderr and "cannot read" in proc.stderr


def test_cli_check_config_directory(tmp_path: Path) -> None:
    proc = run_cli("check-config", str(tmp_path))
    assert_clean_failure(proc)
    assert str(tmp_path) in proc.stderr


def test_cli_check_config_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# caf\xe9\n" + MINIMAL.encode())
    proc = run_cli("check-config", str(path))
    assert_clean_failure(proc)
    assert "UTF-8" in proc.stderr


def test_cli_serve_bad_config_exits_without_serving(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  max_body_bytes: -1\n" + MINIMAL)
    proc = run_cli("serve", "--config", str(path), "--port", "0")  # TimeoutExpired if it serves
    assert_clean_failure(proc)
    assert "$.server.max_body_bytes" in proc.stderr
    assert "serving on" not in proc.stdout


def test_cli_serve_bad_port_env_exits_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(MINIMAL)
    proc = run_cli("serve", "--config", str(path), env={"FASTPATH_GATEWAY_PORT": "eighty"})
    assert_clean_failure(proc, code=1)
    assert "FASTPATH_GATEWAY_PORT" in proc.stderr
    assert "serving on" not in proc.stdout


def test_cli_print_default_config_is_valid(tmp_path: Path) -> None:
    proc = run_cli("print-default-config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == config_mod.default_text()
    path = tmp_path / "default.yaml"
    path.write_text(proc.stdout)
    salt = {"FASTPATH_GATEWAY_SALT": "a-local-test-salt-0123456789"}
    assert run_cli("check-config", str(path), env=salt).returncode == 0


def test_default_config_is_secure_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Auth on; without the salt the default config does not load, and the CLI says what to do
    (in an empty data dir: `make run` keeps a salt in the default one, which `serve` would use)."""
    monkeypatch.delenv("FASTPATH_GATEWAY_SALT", raising=False)
    with pytest.raises(ConfigError, match="FASTPATH_GATEWAY_SALT"):
        config_mod.load(None)
    proc = run_cli(
        "serve",
        "--port",
        "0",
        env={"FASTPATH_GATEWAY_SALT": None, "FASTPATH_GATEWAY_DATA_DIR": str(tmp_path)},
    )
    assert_clean_failure(proc)
    assert "make run" in proc.stderr and "serving on" not in proc.stdout


def test_cli_version() -> None:
    proc = run_cli("version")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert re.fullmatch(r"fastpath-gateway \S+ \(fastpath \S+, (release|debug) build\)", line), line
    assert __version__ in line
    assert f"{BUILD_PROFILE} build" in line


def test_cli_without_command_is_a_usage_error() -> None:
    proc = run_cli()
    assert_clean_failure(proc)
    assert "usage" in proc.stderr


TRITON = """
providers:
  - {name: t, kind: triton, base_url: "grpc://127.0.0.1:8001"}
  - {name: o, base_url: "http://127.0.0.1:9100/v1"}
models:
  - {name: llm, provider: t, upstream_model: ensemble}
  - {name: gpt, provider: o}
"""


def test_triton_provider_model_and_guards_parse() -> None:
    cfg = parse(
        TRITON.replace(
            "upstream_model: ensemble}",
            "upstream_model: ensemble, triton: {stop: ['<|im_end|>'], default_max_tokens: 64}}",
        )
        + """
guards:
  - {name: rules, kind: rules, phrases: {codeword: [open sesame]}, patterns: {ticket: 'T-\\d+'}}
  - {name: model_guard, kind: triton, provider: t, threshold: 0.8, on_error: fail_open, models: [llm]}
"""
    )
    llm = cfg.models[0]
    assert (
        llm.triton is not None and llm.triton.stop == ["<|im_end|>"] and llm.triton.default_max_tokens == 64
    )
    rules, model_guard = cfg.guards
    assert rules.kind is config_mod.GuardKind.RULES and rules.on_error is config_mod.OnError.FAIL_CLOSED
    assert (model_guard.threshold, model_guard.on_error, model_guard.model) == (
        0.8,
        config_mod.OnError.FAIL_OPEN,
        "prompt_guard",
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        pytest.param(
            ("grpc://127.0.0.1:8001", "http://127.0.0.1:8001"), "$.providers[0].base_url", id="http-triton"
        ),
        pytest.param(("grpc://127.0.0.1:8001", "grpc://127.0.0.1"), "grpc://host:port", id="no-port"),
        pytest.param(("grpc://127.0.0.1:8001", "grpc://127.0.0.1:8001/v2"), "no path", id="path"),
        pytest.param(
            ("http://127.0.0.1:9100/v1", "grpc://127.0.0.1:9100"), "$.providers[1].base_url", id="grpc-http"
        ),
        pytest.param(
            ("{name: gpt, provider: o}", "{name: gpt, provider: o, triton: {}}"),
            "$.models[1].triton",
            id="t-on-o",
        ),
        pytest.param(
            ("ensemble}", "ensemble, triton: {stop: ['']}}"), "$.models[0].triton.stop", id="empty-stop"
        ),
        pytest.param(
            ("ensemble}", "ensemble, triton: {chat_template: x, chat_template_file: y}}"),
            "at most one",
            id="two-templates",
        ),
    ],
)
def test_triton_config_errors(change: tuple[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(TRITON.replace(*change))
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("guard", "needle"),
    [
        pytest.param("{name: Bad-Name, kind: rules}", "$.guards[0].name", id="name"),
        pytest.param("{name: g, kind: triton, provider: o}", "must name a triton provider", id="not-triton"),
        pytest.param("{name: g, kind: triton, provider: t, threshold: 0}", "threshold", id="threshold"),
        pytest.param("{name: g, kind: rules, provider: t}", "only for kind triton", id="rules-provider"),
        pytest.param("{name: g, kind: rules, builtin_rules: false}", "needs builtin_rules", id="empty-rules"),
        pytest.param("{name: g, kind: rules, patterns: {x: '('}}", "$.guards[0].patterns.x", id="bad-regex"),
        pytest.param(
            "{name: g, kind: rules, phrases: {x: ['  ']}}", "$.guards[0].phrases.x", id="blank-phrase"
        ),
        pytest.param("{name: g, kind: rules, models: [nope]}", "unknown model 'nope'", id="model"),
        pytest.param("{name: g, kind: rules, timeout_ms: 0}", "timeout_ms", id="timeout"),
        pytest.param("{name: g, kind: sometimes}", "$.guards[0].kind", id="kind"),
    ],
)
def test_guard_config_errors(guard: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(TRITON + f"guards:\n  - {guard}\n")
    assert needle in str(info.value)


def test_providers_are_a_tagged_union_on_kind() -> None:
    """`kind` picks the provider Struct (openai when absent); a field of the other kind is an
    unknown field with a hint, an unknown kind names the path."""
    cfg = config_mod.parse(
        "providers:\n  - {name: a, base_url: 'http://h:1/v1', max_idle_connections: 8}\n"
        "  - {name: t, kind: triton, base_url: 'grpcs://h:8001', tls_ca_file: /ca.pem, transport: grpcio}\n"
        "models: [{name: m, provider: a}]\n"
    )
    a, t = cfg.providers
    assert (
        isinstance(a, config_mod.OpenAIProvider)
        and a.kind is ProviderKind.OPENAI
        and a.max_idle_connections == 8
    )
    assert isinstance(t, config_mod.TritonProvider) and t.kind is ProviderKind.TRITON
    assert t.transport is config_mod.GrpcTransportKind.GRPCIO and t.tls_ca_file == "/ca.pem"
    for extra, field in (("tls_ca_file: /ca.pem", "tls_ca_file"), ("transport: h2", "transport")):
        with pytest.raises(ConfigError, match=f"unknown field `{field}` - at `\\$.providers\\[0\\]` \\(each"):
            config_mod.parse(
                f"providers: [{{name: a, base_url: 'http://h:1/v1', {extra}}}]\n"
                "models: [{name: m, provider: a}]\n"
            )
    with pytest.raises(ConfigError, match="unknown field `max_idle_connections`"):
        config_mod.parse(
            "providers: [{name: t, kind: triton, base_url: 'grpc://h:1', max_idle_connections: 3}]\n"
            "models: [{name: m, provider: t}]\n"
        )
    with pytest.raises(ConfigError, match=r"Invalid value 'bogus' - at `\$.providers\[0\].kind`"):
        config_mod.parse(
            "providers: [{name: a, kind: bogus, base_url: 'http://h:1/v1'}]\n"
            "models: [{name: m, provider: a}]\n"
        )


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ("tracing: {otlp_endpoint: 'grpc://collector:4317'}", "$.tracing.otlp_endpoint"),
        ("tracing: {otlp_endpoint: 'http://'}", "$.tracing.otlp_endpoint"),
        ("tracing: {sample_ratio: 1.5}", "$.tracing.sample_ratio"),
        ("tracing: {batch_max_spans: 0}", "$.tracing.batch_max_spans"),
        ("tracing: {flush_interval_ms: -1}", "$.tracing.flush_interval_ms"),
        ("tracing: {enabled: yes-please}", "$.tracing.enabled"),
        ("tracing: {bogus: 1}", "bogus"),
        ("access_log: {sample_success: -0.1}", "$.access_log.sample_success"),
        ("access_log: {max_bytes: 0}", "$.access_log.max_bytes"),
        ("access_log: {backups: -1}", "$.access_log.backups"),
        ("access_log: {max_queue: 0}", "$.access_log.max_queue"),
    ],
)
def test_tracing_and_access_log_fields_are_validated_with_their_path(section: str, path: str) -> None:
    base = "providers: [{name: a, base_url: 'http://h:1/v1'}]\nmodels: [{name: m, provider: a}]\n"
    with pytest.raises(ConfigError) as info:
        config_mod.parse(base + section + "\n")
    assert path in str(info.value), info.value
