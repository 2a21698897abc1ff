"""Beaver's ML core: score models, losses, datasets, trainers, engines, the synthetic world.

Imports only torch and transformers (deepspeed and vllm inside the functions that need them),
so a notebook, a Celery task and a test can all use it without the service.
"""
