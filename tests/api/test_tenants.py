"""--auth-file: keys map to a tenant and a role; a tenant's upload is visible and usable only to that
tenant and admins, and to everyone else it answers exactly like an adapter that does not exist."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from lora_serve.api.tenants import KeyTable, Principal
from lora_serve.config import ServerConfig
from tests.api.adapter_helpers import TINY_ADAPTERS, adapter_files, make_tiny_adapters, tiny_engine_with, upload
from tests.api.live_server import LiveServer, live_server

ACME, GLOBEX, OPS = "sk-acme-0001", "sk-globex-01", "sk-ops-admin"
LEGACY_USER, LEGACY_ADMIN = "sk-legacy-user", "sk-legacy-admin"
KEYS = {
    "keys": [
        {"key": ACME, "tenant": "acme", "role": "user"},
        {"key": GLOBEX, "tenant": "globex", "role": "user"},
        {"key": OPS, "tenant": "ops", "role": "admin"},
    ]
}
PRIVATE, MISSING = "acme-private", "no-such-adapter"
# Who sees acme's upload: acme and the admins; not globex, nor the --api-key user (no tenant).
SEES = {ACME: True, OPS: True, LEGACY_ADMIN: True, GLOBEX: False, LEGACY_USER: False}
USER_ROUTE_KEYS = [ACME, OPS, GLOBEX, LEGACY_USER]  # the legacy admin key is not a user key (as before)


@pytest.fixture(scope="module")
def tenants_root(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tenants")
    make_tiny_adapters(tiny_llama_dir, root / "src", {"r4-attn": TINY_ADAPTERS["r4-attn"]})
    (root / "keys.json").write_text(json.dumps(KEYS))
    return root


@contextmanager
def tenant_server(tiny_llama_dir: Path, root: Path) -> Iterator[LiveServer]:
    config = ServerConfig(served_model_name="tiny", auth_file=root / "keys.json", api_key=LEGACY_USER, admin_api_key=LEGACY_ADMIN)
    with tiny_engine_with(tiny_llama_dir, root / "adapters") as engine, live_server(engine, config) as live:
        yield live


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tenants_root: Path) -> Iterator[LiveServer]:
    with tenant_server(tiny_llama_dir, tenants_root) as live:
        resp = upload(live.base_url, PRIVATE, adapter_files(tenants_root / "src" / "r4-attn"), api_key=ACME)
        assert resp.status_code == 201, resp.text
        yield live


def _auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def _complete(live: LiveServer, key: str | None, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    return httpx.post(live.base_url + "/v1/completions", json=body, headers=_auth(key), timeout=30)


def _cached_tokens(live: LiveServer, key: str | None, prompt: str) -> int:
    body = {"model": live.model, "prompt": prompt, "max_tokens": 1}
    resp = httpx.post(live.base_url + "/v1/completions", json=body, headers=_auth(key), timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_tenants_never_share_prefix_cache_blocks(server: LiveServer) -> None:
    """The same prompt on the base: a tenant reuses its own cached blocks, never another tenant's (whose
    cached_tokens would tell that the prompt ran before, and whose blocks would change its last float bits)."""
    prompt = "A system prompt long enough to fill a few blocks of sixteen tokens each, then a question. " * 3
    assert _cached_tokens(server, ACME, prompt) == 0
    assert _cached_tokens(server, GLOBEX, prompt) == 0  # the same tokens, another tenant: computed again
    assert _cached_tokens(server, LEGACY_USER, prompt) == 0  # nor the users with no tenant
    assert _cached_tokens(server, ACME, prompt) > 0 and _cached_tokens(server, GLOBEX, prompt) > 0


def _as_missing(resp: httpx.Response) -> dict:
    return json.loads(resp.text.replace(PRIVATE, MISSING))


@pytest.mark.parametrize("key", USER_ROUTE_KEYS)
def test_completions_and_models_show_the_upload_only_to_its_tenant_and_admins(server: LiveServer, key: str) -> None:
    resp = _complete(server, key, PRIVATE)
    models = httpx.get(server.base_url + "/v1/models", headers=_auth(key)).json()["data"]
    card = httpx.get(f"{server.base_url}/v1/models/{PRIVATE}", headers=_auth(key))
    tokens = httpx.post(server.base_url + "/tokenize", json={"model": PRIVATE, "prompt": "hi"}, headers=_auth(key))
    if SEES[key]:
        assert resp.status_code == 200 and resp.json()["model"] == PRIVATE
        assert PRIVATE in [m["id"] for m in models]
        assert card.json() == next(m for m in models if m["id"] == PRIVATE)
        assert tokens.status_code == 200
    else:
        missing = _complete(server, key, MISSING)
        assert (resp.status_code, _as_missing(resp)) == (404, missing.json())
        assert PRIVATE not in [m["id"] for m in models]
        for refused in (card, tokens):
            assert (refused.status_code, _as_missing(refused)) == (404, missing.json())


@pytest.mark.parametrize("key", USER_ROUTE_KEYS)
def test_composing_the_upload_is_for_its_tenant_and_admins_only(server: LiveServer, key: str) -> None:
    def compose(name: str) -> httpx.Response:
        body = {"model": server.model, "prompt": "hi", "max_tokens": 2, "adapters": {name: 0.5}}
        return httpx.post(server.base_url + "/v1/completions", json=body, headers=_auth(key), timeout=30)

    resp = compose(PRIVATE)
    if SEES[key]:
        assert resp.status_code == 200 and resp.json()["model"] == server.model
    else:
        missing = compose(MISSING)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "adapters"
        assert (resp.status_code, _as_missing(resp)) == (404, missing.json())


@pytest.mark.parametrize("key", [ACME, OPS, LEGACY_ADMIN, GLOBEX])
def test_management_calls_show_the_upload_only_to_its_tenant_and_admins(server: LiveServer, key: str) -> None:
    listed = httpx.get(server.base_url + "/v1/adapters", headers=_auth(key)).json()["data"]
    described = httpx.get(f"{server.base_url}/v1/adapters/{PRIVATE}", headers=_auth(key))
    assert (PRIVATE in [a["name"] for a in listed]) == SEES[key]
    if SEES[key]:
        assert described.status_code == 200
    else:
        missing = httpx.get(f"{server.base_url}/v1/adapters/{MISSING}", headers=_auth(key))
        assert (described.status_code, _as_missing(described)) == (404, missing.json())
        deleted = httpx.delete(f"{server.base_url}/v1/adapters/{PRIVATE}", headers=_auth(key))
        assert (deleted.status_code, _as_missing(deleted)) == (404, missing.json())


@pytest.mark.parametrize(
    ("key", "status"),
    [(ACME, 401), (GLOBEX, 401), (LEGACY_USER, 401), (OPS, 200), (LEGACY_ADMIN, 200)],
)
def test_merging_changes_everyones_model_so_only_admins_may(server: LiveServer, key: str, status: int) -> None:
    resp = httpx.post(f"{server.base_url}/v1/adapters/{PRIVATE}/unmerge", headers=_auth(key), timeout=30)
    assert resp.status_code == status


@pytest.mark.parametrize("key", [None, "sk-unknown-key", LEGACY_ADMIN], ids=["no-key", "unknown", "legacy-admin"])
def test_unknown_keys_are_401_on_user_routes(server: LiveServer, key: str | None) -> None:
    assert _complete(server, key, "tiny").status_code == 401


def test_ownership_survives_a_restart(server: LiveServer, tiny_llama_dir: Path, tenants_root: Path) -> None:
    with tenant_server(tiny_llama_dir, tenants_root) as restarted:
        assert _complete(restarted, GLOBEX, PRIVATE).status_code == 404
        assert _complete(restarted, ACME, PRIVATE).status_code == 200


def test_toml_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nkey = "sk-toml-key-1"\ntenant = "t1"\nrole = "admin"\n')
    table = KeyTable.load(path)
    assert table.identify("sk-toml-key-1") == Principal("t1", is_admin=True)
    assert table.identify("sk-toml-key-2") is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{", "JSONDecodeError"),
        ('{"keys": []}', "at least 1 item"),
        ('{"keys": [{"key": "short", "tenant": "t"}]}', "at least 8 characters"),
        ('{"keys": [{"key": "sk-long-enough", "tenant": "t", "role": "root"}]}', "'admin' or 'user'"),
        ('{"keys": [{"key": "sk-long-enough", "tenant": "a/b"}]}', "should match pattern"),
        ('{"keys": [{"key": "sk-long-enough", "tenant": "a"}, {"key": "sk-long-enough", "tenant": "b"}]}', "twice"),
    ],
    ids=["not-json", "no-keys", "short-key", "bad-role", "bad-tenant", "duplicate-key"],
)
def test_bad_key_files_are_refused_without_echoing_keys(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=reason) as caught:
        KeyTable.load(path)
    assert "sk-long-enough" not in str(caught.value) and "short" not in str(caught.value)


@pytest.mark.parametrize(("key", "admin"), [(ACME, False), (GLOBEX, False), (LEGACY_USER, False), (OPS, True)])
def test_models_show_server_paths_only_to_admins(server: LiveServer, tenants_root: Path, key: str, admin: bool) -> None:
    resp = httpx.get(server.base_url + "/v1/models", headers=_auth(key))
    roots = {m["id"]: m["root"] for m in resp.json()["data"]}
    model_path, folder = server.engine.model_path, server.engine.adapters.get(PRIVATE).path
    if admin:
        assert roots == {"tiny": str(model_path), PRIVATE: str(folder)}
    else:
        assert roots["tiny"] == model_path.name and roots.get(PRIVATE, PRIVATE) == PRIVATE
        assert str(model_path.parent) not in resp.text and str(tenants_root) not in resp.text


@pytest.mark.parametrize(("key", "admin"), [(ACME, False), (OPS, True), (LEGACY_ADMIN, True)])
def test_adapter_descriptions_show_server_paths_only_to_admins(server: LiveServer, tenants_root: Path, key: str, admin: bool) -> None:
    described = httpx.get(f"{server.base_url}/v1/adapters/{PRIVATE}", headers=_auth(key))
    listed = httpx.get(server.base_url + "/v1/adapters", headers=_auth(key))
    folder = server.engine.adapters.get(PRIVATE).path
    paths = [described.json()["path"], *(a["path"] for a in listed.json()["data"])]
    assert paths == [str(folder) if admin else PRIVATE] * 2
    if not admin:
        assert str(tenants_root) not in described.text + listed.text
