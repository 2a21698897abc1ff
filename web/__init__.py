"""The arena page, installed as ``api.web`` and served by ``api.app`` at ``/``."""
