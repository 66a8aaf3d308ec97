"""The token a non-loopback server requires: header, cookie, or the page's query; health stays open."""
import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from melanoma_siamese.auth import BearerToken, is_loopback  # noqa: E402


@pytest.fixture()
def client():
    app = FastAPI()

    @app.get("/")
    def page():
        return {"page": True}

    @app.get("/api/health")
    def health():
        return {"status": "ok"}

    @app.get("/api/similar/x/image")
    def image():
        return {"image": True}

    app.add_middleware(BearerToken, token="s3cret")
    return TestClient(app)


def test_every_route_but_health_needs_the_token(client):
    assert client.get("/api/health").status_code == 200
    for path in ("/", "/api/similar/x/image", "/openapi.json"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/similar/x/image", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/similar/x/image", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_page_opened_with_its_token_sets_a_cookie_the_page_then_sends(client):
    assert client.get("/api/similar/x/image?token=s3cret").status_code == 401  # the query opens the page only
    response = client.get("/?token=s3cret")
    assert response.status_code == 200
    assert "HttpOnly" in response.headers["set-cookie"]
    assert client.get("/api/similar/x/image").status_code == 200  # the client kept the cookie


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "::", "example.org"))


def test_serve_off_loopback_without_a_token_is_refused(tmp_path, capsys, monkeypatch):
    from melanoma_siamese.cli import main

    monkeypatch.delenv("MELANOMA_SIAMESE_TOKEN", raising=False)
    assert main(["serve", "--run", str(tmp_path), "--host", "0.0.0.0"]) == 2
    message = capsys.readouterr().err
    assert "--token" in message and "MELANOMA_SIAMESE_TOKEN" in message and "0.0.0.0" in message
