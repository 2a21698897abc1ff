"""/docs without internet (issue 21): Swagger UI from Beaver's own /static (vendored, pinned), no other
host named; /static serves the page's modules and the vendored libraries and nothing else of web/."""

from __future__ import annotations

import re

from api.app import WEB_DIR


def test_docs_names_no_other_host_and_its_assets_answer(client):
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, flags=re.I), "/docs names another host"
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url: *'([^']+)'", html)
    assert {"/static/vendor/swagger-ui-5.36.0/swagger-ui-bundle.js", "/static/vendor/swagger-ui-5.36.0/swagger-ui.css",
            "/openapi.json"} <= set(assets), assets
    assert "validatorUrl" in html  # no validator.swagger.io badge: null
    for url in assets:
        answer = client.get(url)
        assert answer.status_code == 200, url
    assert client.get("/static/vendor/swagger-ui-5.36.0/swagger-ui-bundle.js").headers["content-type"].startswith(
        "text/javascript")


def test_the_page_loads_only_its_own_files(client):
    r = client.get("/")
    html = r.text
    assert not re.search(r"""(?:src|href)=["'](?:https?:)?//""", html), "the page names another host"
    for url in re.findall(r"""(?:src|href)=["'](/static/[^"']+)["']""", html):
        assert client.get(url).status_code == 200, url
    assert {"/static/arena.js", "/static/runs.js", "/static/vendor/uplot-1.6.32/uPlot.iife.min.js"} <= set(
        re.findall(r"""src=["']([^"']+)["']""", html))
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "style-src 'self'" in csp and "img-src 'self' data: blob:;" in csp


def test_static_serves_nothing_else(client):
    assert (WEB_DIR / "__init__.py").is_file() and (WEB_DIR / "index.html").is_file()
    for name in ("__init__.py", "index.html", "%2e%2e/api/app.py", "vendor/%2e%2e/%2e%2e/pyproject.toml", "nope.js",
                 "vendor"):
        assert client.get(f"/static/{name}").status_code == 404, name
    licence = client.get("/static/vendor/uplot-1.6.32/LICENSE")
    assert licence.status_code == 200 and "MIT" in licence.text
