"""The gunicorn entry point: `gunicorn 'faceparse.wsgi:app'` builds the API from FACEPARSE_* variables."""

from __future__ import annotations

from api import create_app
from faceparse.settings import Settings

app = create_app(Settings())
