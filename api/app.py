"""The FastAPI application: routers per resource, one error shape, the arena page."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from api.errors import install_error_handlers
from api.routers import chat, datasets, health, jobs, keys, models, rounds, scores, votes
from api.serving import close_pool

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


@asynccontextmanager
async def lifespan(_app: FastAPI):
    yield
    await close_pool()  # stop the serving engines' threads and HTTP clients


def create_app() -> FastAPI:
    app = FastAPI(title="Beaver", version="0.1.0", lifespan=lifespan,
                  description="Self-hosted Safe RLHF: preference data, reward/cost models, PPO-Lagrangian rounds, serving.")
    install_error_handlers(app)
    for module in (health, keys, datasets, jobs, models, rounds, chat, scores, votes):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    def index():
        page = WEB_DIR / "index.html"
        if page.is_file():
            return FileResponse(page)
        return {"name": "Beaver", "docs": "/docs"}

    return app
