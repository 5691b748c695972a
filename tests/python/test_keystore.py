"""The key store (SQLite): hash-only storage, the `keys` CLI, and a running gateway that picks up
created and revoked keys within seconds, without a restart and without logging a secret."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import MockUpstream, gateway_config, run_gateway

from gateway import config as config_mod
from gateway import keystore
from gateway.keystore import KeyExistsError, KeyStoreError, SqliteKeyStore, StoredKey

SALT = "salt-for-keystore-tests-0123"
SECRET = "sk-fp-unit-test-secret-0123456789abcdef"


def stored(key_id: str, secret: str = SECRET, **fields: Any) -> StoredKey:
    return StoredKey(
        id=key_id,
        key_hash=config_mod.hash_key(SALT, secret),
        team=fields.pop("team", "research"),
        tier=fields.pop("tier", "pro"),
        created_at=time.time(),
        **fields,
    )


# ---- the store ----------------------------------------------------------------------------------
def test_create_list_revoke(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys.db"
    writer = SqliteKeyStore(path, SALT, readonly=False)
    reader = SqliteKeyStore(path, SALT, readonly=True)
    try:
        assert reader.version() is None  # no file yet: an empty store, not an error
        assert reader.load_all() == (0, [])
        assert not path.exists()  # readers never create it
        writer.create(stored("a", models=("echo", "slow"), expires_at=4102444800.0))
        v1 = reader.version()
        assert v1 is not None
        writer.create(stored("b", "sk-fp-another-secret-0123456789"))
        v2 = reader.version()
        assert v2 is not None and v2 > v1
        version, keys = reader.load_all()
        assert version == v2
        assert [k.id for k in keys] == ["a", "b"]
        assert keys[0].models == ("echo", "slow")
        assert keys[0].expires_at == 4102444800.0
        assert keys[0].status() == "active"
        with pytest.raises(KeyExistsError):
            writer.create(stored("a", "sk-fp-a-third-secret-0123456789"))
        assert reader.version() == v2  # a refused write changes nothing
        assert writer.revoke("a", time.time())
        assert not writer.revoke("a", time.time())  # already revoked
        assert not writer.revoke("nope", time.time())
        v3 = reader.version()
        assert v3 is not None and v3 > v2
        assert [k.id for k in reader.load_all()[1]] == ["b"]  # revoked keys are not loaded
        listed = {k.id: k.status() for k in writer.list_keys()}
        assert listed == {"a": "revoked", "b": "active"}
        with pytest.raises(KeyStoreError, match="read-only"):
            reader.create(stored("c", "sk-fp-yet-another-secret-012345"))
    finally:
        writer.close()
        reader.close()
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_only_the_hash_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    store = SqliteKeyStore(path, SALT, readonly=False)
    store.create(stored("a"))
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the db and any journal
    assert SECRET.encode() not in raw
    assert SALT.encode() not in raw
    assert config_mod.hash_key(SALT, SECRET).encode() in raw
    assert "sk-fp" not in repr(stored("a")) and "sha256" not in repr(stored("a"))


def test_a_store_is_never_read_with_another_salt(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    store = SqliteKeyStore(path, SALT, readonly=False)
    store.create(stored("a"))
    store.close()
    for readonly in (True, False):
        other = SqliteKeyStore(path, "another-salt-0123456789", readonly=readonly)
        with pytest.raises(KeyStoreError, match=r"different `auth\.salt`"):
            other.load_all()
        other.close()
    with pytest.raises(KeyStoreError, match=r"auth\.salt"):
        SqliteKeyStore(path, "", readonly=True)


def test_config_store_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = gateway_config(9)
    salted = config_mod.parse(base + f"auth:\n  salt: {SALT}\n")
    assert salted.auth.store == config_mod.KeyStoreConfig(kind=config_mod.StoreKind.SQLITE)
    monkeypatch.setenv("FASTPATH_GATEWAY_DATA_DIR", str(tmp_path))
    assert salted.auth.store is not None
    assert keystore.store_path(salted.auth.store) == tmp_path / "keys.db"
    # no salt configured (a random one per process): no store, since its hashes would not verify
    unsalted = config_mod.parse(base + "auth:\n  keys:\n    - id: a\n      key: sk-0123456789abcdef\n")
    assert unsalted.auth.store is not None and unsalted.auth.store.kind is config_mod.StoreKind.NONE
    assert keystore.open_store(unsalted, readonly=True) is None
    with pytest.raises(config_mod.ConfigError, match=r"\$\.auth\.salt: required by auth\.store"):
        config_mod.parse(base + "auth:\n  store: {kind: sqlite}\n")
    with pytest.raises(config_mod.ConfigError, match=r"poll_interval_ms: must be > 0"):
        config_mod.parse(base + f"auth:\n  salt: {SALT}\n  store: {{poll_interval_ms: 0}}\n")
    with pytest.raises(config_mod.ConfigError, match=r"at `\$\.auth\.store\.kind`"):
        config_mod.parse(base + f"auth:\n  salt: {SALT}\n  store: {{kind: mysql}}\n")
    with pytest.raises(config_mod.ConfigError, match=r"\$\.auth\.store\.dsn: required"):
        config_mod.parse(base + f"auth:\n  salt: {SALT}\n  store: {{kind: postgres}}\n")


def test_auth_stage_merges_stored_keys_with_config_keys(tmp_path: Path) -> None:
    from gateway.pipeline.auth import AuthStage

    path = tmp_path / "keys.db"
    cfg = config_mod.parse(
        gateway_config(9)
        + f"""
auth:
  enabled: true
  salt: {SALT}
  keys: [{{id: boot, key: sk-test-bootstrap-0123456789}}]
  store: {{path: {path}}}
tiers: {{default: {{}}, pro: {{rpm: 10}}}}
"""
    )
    writer = SqliteKeyStore(path, SALT, readonly=False)
    stage = AuthStage(cfg, keystore.open_store(cfg, readonly=True))

    def ids() -> set[str]:
        return {p.key_id for p in stage._principals.values()}

    try:
        assert not stage.refresh() and ids() == {"boot"}  # no store file yet
        writer.create(stored("ok", models=("echo",)))
        writer.create(stored("gold", "sk-fp-gold-tier-secret-0123456789", tier="gold"))  # unknown tier
        writer.create(stored("boot", "sk-fp-shadow-secret-0123456789"))  # a config key's id
        assert stage.refresh() and ids() == {"boot", "ok"}
        assert not stage.refresh()  # unchanged version: nothing reloaded
        ok = next(p for p in stage._principals.values() if p.key_id == "ok")
        assert ok.models == frozenset({"echo"}) and ok.tier.rpm == 10 and ok.team == "research"
        # an unreadable store (here: another salt) keeps the keys loaded before
        path.unlink()
        other = SqliteKeyStore(path, "another-salt-0123456789", readonly=False)
        other.create(stored("x", "sk-fp-other-salt-secret-012345"))
        other.close()
        assert not stage.refresh() and ids() == {"boot", "ok"}
        path.unlink()  # a deleted store: config keys only
        assert stage.refresh() and ids() == {"boot"}
    finally:
        writer.close()
        asyncio.run(stage.close())  # never started: just closes the store


# ---- the CLI ------------------------------------------------------------------------------------
def cli_config(tmp: Path, upstream_port: int = 9, *, enabled: bool = False, poll_ms: int = 1000) -> Path:
    cfg = tmp / "gateway.yaml"
    cfg.write_text(
        gateway_config(upstream_port)
        + f"""
auth:
  enabled: {"true" if enabled else "false"}
  salt: {SALT}
  keys:
    - id: boot
      key: sk-test-bootstrap-0123456789
  store:
    kind: sqlite
    path: {tmp / "store" / "keys.db"}
    poll_interval_ms: {poll_ms}
tiers:
  default: {{}}
  pro: {{rpm: 100000}}
"""
    )
    return cfg


def keys_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", *args, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def create_key(cfg: Path, *args: str) -> str:
    out = keys_cli(cfg, "create", *args)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.rstrip("\n").splitlines()[-1]
    assert secret.startswith("sk-fp-") and len(secret) >= 6 + 43, out.stdout
    assert out.stdout.count(secret) == 1 and secret not in out.stderr
    return secret


def test_cli_create_list_revoke(tmp_path: Path) -> None:
    cfg = cli_config(tmp_path)
    secret = create_key(
        cfg, "--team", "research", "--tier", "pro", "--models", "echo,slow", "--id", "alice-1",
        "--expires", "2030-01-01T00:00:00Z",
    )  # fmt: skip
    other = create_key(cfg, "--team", "apps", "--tier", "default")
    assert other != secret
    listed = keys_cli(cfg, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "TEAM", "TIER", "MODELS", "STATUS"]
    alice = next(line for line in lines if line.startswith("alice-1 "))
    assert alice.split()[1:6] == ["research", "pro", "echo,slow", "active", alice.split()[5]]
    assert "2030-01-01T00:00:00Z" in alice
    as_json = json.loads(keys_cli(cfg, "list", "--json").stdout)
    assert as_json[0]["id"] == "alice-1" and as_json[1]["id"].startswith("key-")
    assert as_json[1]["team"] == "apps" and as_json[1]["models"] == []
    for text in (listed.stdout, json.dumps(as_json)):
        assert secret not in text and other not in text and "sha256" not in text
    db = (tmp_path / "store" / "keys.db").read_bytes()
    assert secret.encode() not in db and other.encode() not in db

    revoked = keys_cli(cfg, "revoke", "alice-1")
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in keys_cli(cfg, "list").stdout.splitlines()[1]
    assert keys_cli(cfg, "revoke", "alice-1").returncode == 0  # idempotent
    missing = keys_cli(cfg, "revoke", "nobody")
    assert missing.returncode == 1 and "no stored key" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--team", "t", "--tier", "gold"], "unknown tier 'gold' (known: default, pro)"),
        (["--team", "t", "--tier", "pro", "--models", "echo,gpt-9"], "unknown model(s) gpt-9"),
        (["--team", "t", "--tier", "pro", "--expires", "2001-01-01T00:00:00Z"], "in the past"),
        (["--team", "t", "--tier", "pro", "--expires", "2031-01-01T00:00:00"], "needs a timezone"),
        (["--team", "t", "--tier", "pro", "--expires", "soon"], "not an ISO 8601 time"),
        (["--team", "t", "--tier", "pro", "--id", "boot"], "already a key id in the config"),
        (["--team", "t", "--tier", "pro", "--id", "bad id!"], "--id: 1-64"),
        (["--team", "", "--tier", "pro"], "--team: 1-128"),
    ],
)
def test_cli_create_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    out = keys_cli(cli_config(tmp_path), "create", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "sk-fp-" not in out.stdout
    assert not (tmp_path / "store" / "keys.db").exists()  # nothing written


def test_cli_refuses_a_duplicate_id_and_a_config_without_store(tmp_path: Path) -> None:
    cfg = cli_config(tmp_path)
    create_key(cfg, "--team", "t", "--tier", "pro", "--id", "dup")
    out = keys_cli(cfg, "create", "--team", "t", "--tier", "pro", "--id", "dup")
    assert out.returncode == 2 and "already exists" in out.stderr
    no_salt = tmp_path / "nosalt.yaml"
    no_salt.write_text(gateway_config(9))
    out = keys_cli(no_salt, "create", "--team", "t", "--tier", "default")
    assert out.returncode == 2 and "auth.salt" in out.stderr
    none = tmp_path / "none.yaml"
    none.write_text(gateway_config(9) + f"auth:\n  salt: {SALT}\n  store: {{kind: none}}\n")
    out = keys_cli(none, "list")
    assert out.returncode == 2 and "no key store" in out.stderr


# ---- a running gateway --------------------------------------------------------------------------
def status_of(port: int, key: str) -> int:
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body,
            {"content-type": "application/json", "authorization": f"Bearer {key}"},
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.1)


def test_running_gateway_picks_up_created_and_revoked_keys(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    cfg = cli_config(tmp_path, mock_upstream.port, enabled=True, poll_ms=200)
    log_path = tmp_path / "gateway.log"
    with (
        log_path.open("wb") as log,
        run_gateway(
            tmp_path, mock_upstream, config_text=cfg.read_text(), log_level="debug", output=log
        ) as gw,
    ):
        assert status_of(gw.port, "sk-test-bootstrap-0123456789") == 200  # config keys still work
        # the store file does not exist yet: created by the CLI while the gateway runs
        first = create_key(cfg, "--team", "research", "--tier", "pro", "--id", "first")
        eventually(lambda: status_of(gw.port, first) == 200)
        second = create_key(cfg, "--team", "apps", "--tier", "default", "--models", "slow")
        eventually(lambda: status_of(gw.port, second) == 403)  # known, but not for this model
        assert keys_cli(cfg, "revoke", "first").returncode == 0
        eventually(lambda: status_of(gw.port, first) == 401)
        assert status_of(gw.port, second) == 403
        assert status_of(gw.port, "sk-test-bootstrap-0123456789") == 200
    log_text = log_path.read_text(errors="replace")
    assert "stored key(s) in force" in log_text  # the log is captured: the checks below can fail
    for secret in (first, second, SALT, "sk-test-bootstrap"):
        assert secret not in log_text
    assert "sha256:" not in log_text
