"""Celery app and tasks: turn job rows into calls of ``models/`` entry points."""
