"""A recipe's last step uploads its signed bundle to a fleet through the HTTP API (the real app, real keys)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fleet.settings import Settings
from protocol.errors import ConfigError
from protocol.trust import PrivateKey, generate_keypair
from trainer.pipeline import UploadSpec, http_upload

from .conftest import ADMIN_TOKEN


@pytest.fixture
def recipe(tmp_path: Path, tiny_hf: Path, key: PrivateKey) -> Path:
    (tmp_path / "k.pem").write_bytes(key.to_pem())
    path = tmp_path / "recipe.toml"
    path.write_text(f"""work_dir = "work"
[base]
path = "{tiny_hf}"
[eval]
limit = 4
[bundle]
name = "triage"
version = 5
out = "triage.bundle"
keys = ["k.pem"]
created = 2026-11-20T00:00:00Z
expires_days = 3650
""")
    return path


def test_the_fleet_stores_the_bundle_a_recipe_built(recipe: Path, client: TestClient,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from slmops.pipeline import run_file

    result = run_file(recipe, progress=False)
    monkeypatch.setenv("SLMOPS_TOKEN", ADMIN_TOKEN)
    stored = http_upload(result.bundle, UploadSpec(url="http://fleet.test"), client=client)
    assert (stored["name"], stored["version"]) == ("triage", 5)
    listed = client.get("/api/v1/bundles").json()
    assert [(b["name"], b["version"]) for b in listed] == [("triage", 5)]


REFUSED = {
    "no token in the environment": (None, "set SLMOPS_TOKEN"),
    "a wrong token": ("slm_" + "x" * 43, "HTTP 401"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_upload_the_fleet_refuses_stores_nothing(case: str, recipe: Path, client: TestClient,
                                                     monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    from slmops.pipeline import run_file

    token, needle = REFUSED[case]
    result = run_file(recipe, progress=False)
    if token is None:
        monkeypatch.delenv("SLMOPS_TOKEN", raising=False)
    else:
        monkeypatch.setenv("SLMOPS_TOKEN", token)
    with pytest.raises(ConfigError, match=needle):
        http_upload(result.bundle, UploadSpec(url="http://fleet.test"), client=client)
    assert client.get("/api/v1/bundles").json() == []


def test_a_bundle_signed_by_a_key_the_fleet_does_not_trust_is_refused(recipe: Path, client: TestClient,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from slmops.pipeline import run_file

    (recipe.parent / "k.pem").write_bytes(generate_keypair().to_pem())
    result = run_file(recipe, progress=False)
    monkeypatch.setenv("SLMOPS_TOKEN", ADMIN_TOKEN)
    with pytest.raises(ConfigError, match="refused the bundle: HTTP 4"):
        http_upload(result.bundle, UploadSpec(url="http://fleet.test"), client=client)
    assert client.get("/api/v1/bundles").json() == []
