"""The HTTP API: a Flask app factory serving the v1 contract of DESIGN.md (never imports torch, `worker`)."""

from __future__ import annotations

from api.app import create_app

__all__ = ["create_app"]
