"""OpenAPI 3 from the request/response models (spectree): `/openapi.json` and the docs at `/docs`.

`spec.validate(...)` decorates every view: it validates the query, JSON or form body against the
schema models and records the endpoint in the document. Validation failures are raised as
`RequestInvalid`, so they leave through `api.errors` like every other error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, current_app, redirect, url_for
from spectree import SecurityScheme, SecuritySchemeData, SpecTree

from api.errors import RequestInvalid
from api.schemas import ErrorBody

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue


def _raise_invalid(req: Any, resp: Any, err: Exception | None, instance: Any, adapter: Any) -> None:
    """spectree's before-hook: turn its validation error into ours (422 in the contract's shape)."""
    if err is not None:
        raise RequestInvalid.from_validation_error(err)  # type: ignore[arg-type]


spec = SpecTree(
    "flask",
    title="faceparse",
    description="Face parsing (SegFormer, 19 CelebAMask-HQ labels) as jobs: submit an image, "
    "poll the job or receive a signed webhook, download the mask, overlay and label summary.",
    version="1",
    path="docs",  # spectree's own pages: /docs/swagger/, /docs/redoc/, ...
    mode="strict",  # only decorated views are documented
    annotations=False,
    before=_raise_invalid,
    validation_error_status=422,
    validation_error_model=ErrorBody,
    # Plain schema names (JobOut, not JobOut.d338d7b) and one shared copy of each nested model.
    naming_strategy=lambda model: model.__name__,
    nested_naming_strategy=lambda _parent, child: child,
    security_schemes=[
        SecurityScheme(
            name="bearer",
            data=SecuritySchemeData(type="http", scheme="bearer", description="Authorization: Bearer <key>"),
        ),
    ],
)

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def get_openapi() -> ResponseReturnValue:
    """The OpenAPI document."""
    return current_app.json.response(spec.spec)


@bp.get("/docs")
def get_docs() -> ResponseReturnValue:
    """Interactive docs (spectree's Swagger UI page, reading /docs/openapi.json)."""
    return redirect(url_for("openapi_docs_swagger"))


def documented(**validate_kwargs: Any) -> Callable[[Callable], Callable]:
    """Document a view in the OpenAPI file without spectree wrapping its response.

    spectree reads every response body back to validate it, which breaks streamed file responses
    (`send_file`); such views are registered here for the document only.
    """

    def decorate(view: Callable) -> Callable:
        described = spec.validate(skip_validation=True, **validate_kwargs)(view)

        @functools.wraps(view)
        def plain(*args: Any, **kwargs: Any) -> Any:
            return view(*args, **kwargs)

        plain.__wrapped__ = described  # type: ignore[attr-defined]  # spectree finds its metadata here
        return plain

    return decorate


def init_app(app: Any) -> None:
    """Serve the document and docs pages on `app`."""
    spec.register(app)
    app.register_blueprint(bp)
