"""The demo page at `/`: served by the API, and driven end to end in headless Chromium.

The browser tests run Debian's `chromium` (apt-get install -y chromium) through Playwright against
the session's real stack (gunicorn, two workers, Redis, moto S3). Without chromium they FAIL;
set FACEPARSE_SKIP_BROWSER=1 to skip them on a machine that cannot have one.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from tests.fixtures.api import (  # noqa: F401 - fixtures
    app_fixture,
    client_fixture,
    settings_fixture,
    tenants_fixture,
)
from tests.fixtures.stack import API_KEYS, Stack

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "faceparse" / "samples" / "astronaut.png"
CHROMIUM = os.environ.get("FACEPARSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("FACEPARSE_PAGE_SCREENSHOT", "/tmp/faceparse-page.png"))
JOB_TIMEOUT_MS = 90_000
# The page redoes the worker's blend in the browser: rounding may differ by one step per channel.
PIXEL_TOLERANCE = 2


# --- served by the API (no browser) -------------------------------------------------------------
def test_page_is_served_with_its_assets(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert 'data-auth="on"' in html  # the settings fixture configures API keys
    for asset, mimetype in (("/page/app.js", "text/javascript"), ("/page/style.css", "text/css")):
        assert f'"{asset}"' in html
        resp = client.get(asset)
        assert resp.status_code == 200 and resp.mimetype == mimetype, asset
        assert len(resp.get_data()) > 500


def test_page_hides_the_key_field_when_auth_is_off(settings) -> None:
    from api import create_app

    app = create_app(settings.model_copy(update={"api_keys": ""}))
    html = app.test_client().get("/").get_data(as_text=True)
    assert 'data-auth="off"' in html and "__FACEPARSE_AUTH__" not in html


def test_page_is_not_in_the_openapi_document(client) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    assert "/" not in paths and not any(p.startswith("/page") for p in paths)


# --- in the browser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (the system's), through Playwright; never a downloaded browser."""
    if os.environ.get("FACEPARSE_SKIP_BROWSER") == "1":
        pytest.skip("FACEPARSE_SKIP_BROWSER=1")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: `apt-get install -y chromium` (or set "
                    "FACEPARSE_CHROMIUM, or FACEPARSE_SKIP_BROWSER=1 to skip the browser tests)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{stack.api_url}/")
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _canvas_pixels(page: Any, points: list[tuple[int, int]]) -> np.ndarray:
    rgb = page.evaluate(
        """(points) => {
            const c = document.getElementById("view");
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const at = ([x, y]) => (y * c.width + x) * 4;
            return points.map((p) => Array.from(d.slice(at(p), at(p) + 3)));
        }""",
        [list(p) for p in points],
    )
    return np.array(rgb, dtype=np.int16)


def _png(url: str) -> np.ndarray:
    resp = requests.get(url, timeout=10)
    resp.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(resp.content)))


def test_upload_shows_overlay_legend_warning_and_toggles(page: Any, stack: Stack) -> None:
    from worker.outputs import PALETTE

    key = page.locator("#api-key")
    assert key.is_visible()  # the stack runs with API keys
    key.fill(API_KEYS["alice"])
    page.set_input_files("#file", str(SAMPLE))
    page.wait_for_selector("#result[data-ready=true]", timeout=JOB_TIMEOUT_MS)
    page.wait_for_selector("#status[data-status=succeeded]", timeout=10_000)
    job_id = re.search(r"Job (\S+):", page.inner_text("#status")).group(1)
    job = stack.client("alice").get(job_id)
    assert job["status"] == "succeeded"

    # The tiny model has random weights: the page says so, prominently.
    warning = page.locator("#warning")
    assert warning.is_visible() and "random weights" in warning.inner_text()

    # The legend lists exactly the labels of the summary, with their areas and the worker's colours.
    labels = {entry["id"]: entry for entry in job["summary"]["labels"]}
    rows = page.locator("#legend tbody tr")
    assert rows.count() == len(labels) >= 2
    for i in range(rows.count()):
        row = rows.nth(i)
        entry = labels[int(row.get_attribute("data-label-id"))]
        assert row.get_attribute("data-label") == entry["name"]
        assert f"{entry['fraction'] * 100:.2f} %" in row.inner_text()
        if entry["id"] != 0:
            swatch = row.locator(".swatch").evaluate("e => getComputedStyle(e).backgroundColor")
            rgb = np.array([int(v) for v in re.findall(r"\d+", swatch)[:3]])
            assert np.abs(rgb - PALETTE[entry["id"]]).max() <= PIXEL_TOLERANCE, (entry["name"], swatch)

    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # With every label on, the canvas is the worker's overlay.png; switching the largest label off
    # shows the photo there and leaves the other labels' pixels as they were.
    mask = _png(job["outputs"]["mask"]["url"])
    overlay = _png(job["outputs"]["overlay"]["url"]).astype(np.int16)[..., :3]
    photo = np.asarray(Image.open(SAMPLE).convert("RGB")).astype(np.int16)
    target = max((e for e in labels.values() if e["id"] != 0), key=lambda e: e["pixels"])
    other = next(e for e in labels.values() if e["id"] not in (0, target["id"]))
    rng = np.random.default_rng(0)

    def sample(label: int) -> list[tuple[int, int]]:
        ys, xs = np.nonzero(mask == label)
        pick = rng.choice(len(xs), size=min(64, len(xs)), replace=False)
        return [(int(xs[i]), int(ys[i])) for i in pick]

    on, kept = sample(target["id"]), sample(other["id"])
    idx_on, idx_kept = (tuple(np.array(p).T[::-1]) for p in (on, kept))
    assert np.abs(_canvas_pixels(page, on) - overlay[idx_on]).max() <= PIXEL_TOLERANCE
    page.locator(f"#legend tr[data-label-id='{target['id']}'] input[type=checkbox]").uncheck()
    assert np.abs(_canvas_pixels(page, on) - photo[idx_on]).max() <= PIXEL_TOLERANCE
    assert np.abs(_canvas_pixels(page, kept) - overlay[idx_kept]).max() <= PIXEL_TOLERANCE

    # The key survives a reload (localStorage).
    page.reload()
    assert page.locator("#api-key").input_value() == API_KEYS["alice"]


def test_rejected_upload_shows_the_api_error(page: Any, tmp_path: Path) -> None:
    page.locator("#api-key").fill(API_KEYS["alice"])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"this is not a PNG at all")
    page.set_input_files("#file", str(not_an_image))
    page.wait_for_selector("#status[data-status=error]", timeout=20_000)
    error = page.locator("#error")
    assert error.is_visible() and "unsupported_format" in error.inner_text()
    assert page.locator("#result").is_hidden()


def test_wrong_key_shows_unauthorized(page: Any) -> None:
    page.locator("#api-key").fill("not-a-key")
    page.set_input_files("#file", str(SAMPLE))
    page.wait_for_selector("#status[data-status=error]", timeout=20_000)
    assert "unauthorized" in page.inner_text("#error")
