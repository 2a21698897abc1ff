"""Beaver's HTTP service: FastAPI app, routers, settings, persistence, CLI."""
