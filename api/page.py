"""The demo page at `/`: drop an image, watch the job, see the overlay, toggle labels, read areas.

Plain HTML, JavaScript and CSS from `api/static/` (no build step). The page talks to the same
public API as any client (`POST /v1/jobs` multipart, `GET /v1/jobs/{id}`) and recolours the label
mask on a canvas in the browser; it is not part of the OpenAPI document.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from flask import Blueprint, Response

from api.services import services

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue

bp = Blueprint("page", __name__, static_folder="static", static_url_path="/page")

# Filled in per request: whether the page should ask for an API key.
AUTH_PLACEHOLDER = "__FACEPARSE_AUTH__"


def _index_html() -> str:
    return resources.files("api").joinpath("static", "index.html").read_text(encoding="utf-8")


@bp.get("/")
def show_page() -> ResponseReturnValue:
    """The page; the API-key field is shown when auth is on."""
    auth = "on" if services().api_keys.enabled else "off"
    html = _index_html().replace(AUTH_PLACEHOLDER, auth)
    response = Response(html, mimetype="text/html")
    # The page is tiny and changes with deployments: always revalidate.
    response.headers["Cache-Control"] = "no-cache"
    return response
