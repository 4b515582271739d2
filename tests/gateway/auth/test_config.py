"""Which authentication runs, and refusing to start without one in production."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import structlog

from gateway import cli
from gateway.auth.config import is_demo_mappings, resolve_auth
from gateway.auth.devkeys import DEV_AUDIENCE, DEV_ISSUER
from gateway.auth.errors import AuthConfigError
from gateway.settings import Settings, default_mappings_dir

DEMO = default_mappings_dir()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CCG_"):
            monkeypatch.delenv(key)
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The demo mappings copied elsewhere: a production configuration."""
    shutil.copytree(DEMO.parent / "codemaps", tmp_path / "m" / "codemaps")
    shutil.copytree(DEMO, tmp_path / "m" / "pas")
    return tmp_path / "m" / "pas"


def test_bundled_demo_directories_only() -> None:
    assert is_demo_mappings(DEMO)
    assert is_demo_mappings(DEMO.parent / "demo-hl7v2")
    assert not is_demo_mappings(DEMO.parent / "codemaps")
    assert not is_demo_mappings(DEMO.parent)
    assert not is_demo_mappings(Path("/nonexistent/demo-pas"))


def test_a_copy_of_the_demo_is_production(copy: Path) -> None:
    assert not is_demo_mappings(copy)
    (copy.parent / "demo-pas").symlink_to(copy)
    assert not is_demo_mappings(copy.parent / "demo-pas")  # the name is not enough


def test_demo_default_is_jwt_with_the_dev_key(tmp_path: Path) -> None:
    config = resolve_auth(Settings(data_dir=tmp_path))
    assert config.mode == "jwt" and not config.production
    assert config.jwt is not None and config.jwt.dev
    assert (config.jwt.issuer, config.jwt.audiences) == (DEV_ISSUER, (DEV_AUDIENCE,))
    key = tmp_path / "dev-auth" / "signing-key.pem"
    assert key.stat().st_mode & 0o077 == 0
    first = key.read_bytes()
    assert json.loads((tmp_path / "dev-auth" / "jwks.json").read_text())["keys"][0]["alg"] \
        == "ES256"
    again = resolve_auth(Settings(data_dir=tmp_path))  # the same key on the next start
    assert again.jwt is not None and again.jwt.jwks_file == config.jwt.jwks_file
    assert key.read_bytes() == first


@pytest.mark.parametrize("settings", [
    {"mappings_dir": "COPY"},
    {"mappings_dir": "COPY", "auth_mode": "insecure-demo"},
    {"env": "production"},
    {"env": "production", "auth_mode": "insecure-demo"},
    {"env": "production", "auth_mode": "jwt"},  # no dev-key fallback in production
    {"mappings_dir": "COPY", "auth_mode": "jwt"},
])
def test_production_refuses_insecure_and_unconfigured(tmp_path: Path, copy: Path,
                                                      settings: dict[str, str]) -> None:
    values = {k: (copy if v == "COPY" else v) for k, v in settings.items()}
    with pytest.raises(AuthConfigError) as info:
        resolve_auth(Settings(data_dir=tmp_path, **values))  # type: ignore[arg-type]
    assert any(word in str(info.value) for word in ("insecure-demo is refused",
                                                     "no authentication configured",
                                                     "JWT authentication needs"))
    assert not (tmp_path / "dev-auth").exists()


@pytest.mark.parametrize(("settings", "message"), [
    ({"auth_mode": "oauth"}, "must be one of"),
    ({"env": "prod"}, "CCG_ENV must be"),
    ({"auth_mode": "jwt", "jwt_issuer": "https://idp"}, "CCG_JWT_AUDIENCE"),
    ({"auth_mode": "jwt", "jwt_issuer": "i", "jwt_audience": "a"}, "CCG_JWT_JWKS_URL or"),
    ({"auth_mode": "jwt", "jwt_issuer": "i", "jwt_audience": "a",
      "jwt_jwks_url": "http://idp.example/jwks"}, "https://"),
    ({"auth_mode": "jwt", "jwt_issuer": "i", "jwt_audience": "a",
      "jwt_jwks_url": "https://idp.example/jwks", "jwt_algorithms": "RS256,HS256"}, "refused"),
    ({"auth_mode": "jwt", "jwt_issuer": "i", "jwt_audience": "a",
      "jwt_jwks_url": "https://idp.example/jwks", "jwt_jwks_file": "/x"}, "not both"),
    ({"auth_mode": "jwt", "jwt_issuer": "i", "jwt_audience": "a",
      "jwt_jwks_file": "/nonexistent/jwks.json"}, "is not a file"),
    ({"auth_mode": "api-key"}, "CCG_API_KEYS_FILE must be set"),
    ({"auth_mode": "mtls"}, "CCG_SSL_CERTFILE"),
    ({"auth_mode": "mtls", "ssl_certfile": "c", "ssl_keyfile": "k", "ssl_ca_certs": "ca"},
     "CCG_MTLS_CLIENTS_FILE must be set"),
])
def test_bad_settings(tmp_path: Path, settings: dict[str, str], message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        resolve_auth(Settings(data_dir=tmp_path, **settings))  # type: ignore[arg-type]


def test_production_with_a_complete_jwt_configuration_starts(tmp_path: Path,
                                                             copy: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    config = resolve_auth(Settings(
        data_dir=tmp_path, mappings_dir=copy, auth_mode="jwt", jwt_issuer="https://idp",
        jwt_audience="https://fhir.example/STU3, urn:gw", jwt_jwks_file=str(jwks)))
    assert config.production and config.jwt is not None and not config.jwt.dev
    assert config.jwt.audiences == ("https://fhir.example/STU3", "urn:gw")


def test_serve_exits_2_without_auth_in_production(tmp_path: Path, copy: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCG_PAS_URL", "sqlite://")
    monkeypatch.setenv("CCG_PAGING_SECRET", "x")
    args = ["serve", "--mappings", str(copy), "--data-dir", str(tmp_path / "d"), "--port", "1"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "refusing to start: no authentication configured: set CCG_AUTH_MODE" in err
    monkeypatch.setenv("CCG_AUTH_MODE", "insecure-demo")
    assert cli.main(args) == 2
    assert "refusing to start: CCG_AUTH_MODE=insecure-demo is refused" in capsys.readouterr().err


def test_serve_exits_2_with_insecure_demo_and_ccg_env_production(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCG_ENV", "production")
    monkeypatch.setenv("CCG_AUTH_MODE", "insecure-demo")
    assert cli.main(["serve", "--data-dir", str(tmp_path), "--demo-patients", "300",
                     "--port", "1"]) == 2
    assert "insecure-demo is refused" in capsys.readouterr().err


def test_dev_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dev-token", "--data-dir", str(tmp_path), "--scope",
                     "patient/*.read", "--patient", "100001"]) == 0
    token = capsys.readouterr().out.strip()
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256"
    keys = json.loads((tmp_path / "dev-auth" / "jwks.json").read_text())
    key = jwt.PyJWK(keys["keys"][0]).key
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=DEV_AUDIENCE,
                        issuer=DEV_ISSUER)
    assert claims["scope"] == "patient/*.read" and claims["patient"] == "100001"
    assert claims["exp"] - claims["iat"] == 3600 and claims["jti"]
    assert cli.main(["dev-token", "--data-dir", str(tmp_path)]) == 0  # default user/*.read


@pytest.mark.parametrize(("argv", "message"), [
    (["--scope", "patient/*.read"], "need --patient"),
    (["--scope", "user/*.read openid"], "not SMART resource scopes"),
])
def test_dev_token_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            argv: list[str], message: str) -> None:
    assert cli.main(["dev-token", "--data-dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_dev_token_is_refused_in_production(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CCG_ENV", "production")
    assert cli.main(["dev-token", "--data-dir", str(tmp_path)]) == 2
    assert "production configuration" in capsys.readouterr().err
    assert not (tmp_path / "dev-auth").exists()
