"""The FastAPI application: routers per resource, one error shape, the web page (arena and runs), /docs."""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from api.db import size_threadpool
from api.errors import install_error_handlers, not_found, responses
from api.limits import LIMIT_RESPONSES, RequestLimits, declare_url_limits
from api.routers import arena, chat, datasets, endpoints, health, jobs, keys, leaderboard, models, rounds, scores, votes
from api.serving import close_pool
from api.settings import get_settings

WEB_DIR = Path(str(files("api.web")))  # web/ of the repository, installed as package data
# What /static serves from it: the page's modules and styles, and the vendored libraries with their
# licences (web/vendor/<name>-<version>/, pinned copies of npm packages: no CDN, the page and /docs
# work offline).
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png",
                ".txt": "text/plain; charset=utf-8", "": "text/plain; charset=utf-8"}
SWAGGER_UI = "/static/vendor/swagger-ui-5.36.0"


@asynccontextmanager
async def lifespan(app: FastAPI):
    size_threadpool()  # BEAVER_API_THREADS, which BEAVER_DB_POOL_SIZE defaults to (api/db.py)
    app.state.health = health.HealthMonitor().start()  # /v1/health answers from its snapshot
    yield
    app.state.health.stop()
    await close_pool()  # stop the serving engines' threads and HTTP clients


def create_app() -> FastAPI:
    get_settings()  # a bad BEAVER_* value stops the API at start (SettingsInvalid), not at its first request
    # /docs is served below from the vendored Swagger UI (FastAPI's own loads it from a CDN); no ReDoc.
    app = FastAPI(title="Beaver", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Self-hosted Safe RLHF: preference data, reward/cost models, PPO-Lagrangian rounds, serving.")
    install_error_handlers(app)
    app.add_middleware(RequestLimits)  # key before body, body size, JSON Beaver can store
    for module in (health, keys, endpoints, datasets, jobs, models, rounds, chat, scores, votes, arena, leaderboard):
        # 429: every route but health (answered from memory) waits for a database session (api/db.py).
        busy = {} if module is health else responses(429)
        app.include_router(module.router, responses={**LIMIT_RESPONSES, **busy})

    generate = app.openapi

    def openapi() -> dict:  # FastAPI's, plus what the request limits refuse in a URL
        if app.openapi_schema is None:
            declare_url_limits(generate())
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/favicon.ico", include_in_schema=False)
    @app.get("/favicon.svg", include_in_schema=False)
    def favicon():
        icon = WEB_DIR / "favicon.svg"
        if icon.is_file():
            return Response(icon.read_bytes(), media_type="image/svg+xml",
                            headers={"Cache-Control": "public, max-age=86400"})
        return Response(status_code=204)

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="Beaver API",
                                   swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css", swagger_favicon_url="/favicon.svg",
                                   # no badge from validator.swagger.io: nothing leaves this server
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get("/static/{name:path}", include_in_schema=False)
    def static(name: str):
        root = WEB_DIR.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file() or path.suffix not in STATIC_TYPES:
            raise not_found("file", name)
        # The vendored libraries' folders name their version: cached for good. The page's own modules
        # change with Beaver: revalidated each time.
        cache = "public, max-age=31536000, immutable" if name.startswith("vendor/") else "no-cache"
        return FileResponse(path, media_type=STATIC_TYPES[path.suffix],
                            headers={"Cache-Control": cache, "X-Content-Type-Options": "nosniff"})

    @app.get("/", include_in_schema=False)
    def index():
        page = WEB_DIR / "index.html"
        if page.is_file():
            return HTMLResponse(page.read_text(), headers=PAGE_HEADERS)
        return {"name": "Beaver", "docs": "/docs"}

    return app


# The page runs only this server's scripts (/static: one per view, and the vendored uPlot; no inline script,
# no inline event handler), talks only to this API, and is never framed (no clickjacking of a page that holds
# an API key). A job's plots are fetched with the key and shown as blob: URLs; styles may be inline (the
# views size bars and charts with style attributes).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
