"""The web dashboard: a few static files in this package, served by the fleet at /dashboard/.

Workflow: `router` serves `index.html` at /dashboard/ and each asset by a fixed name (no path from the request ever
reaches the file system); the page asks once for an API token (viewer is enough), keeps it in sessionStorage and
sends it as `Authorization: Bearer` to the same fleet's JSON API, which checks it like any other client's. The
files hold no fleet data, so they are served without a token.

Every answer carries a strict Content-Security-Policy: scripts, styles and images from the fleet only (no inline
script or style element, no CDN), requests to the fleet only, no framing. Plots are inline SVG drawn by app.js.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FILES = {  # URL name -> (file in this package, media type)
    "": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "plot.js": ("plot.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
    "favicon.svg": ("favicon.svg", "image/svg+xml"),
}

router = APIRouter(prefix="/dashboard", include_in_schema=False)


def _file(name: str) -> Response:
    filename, media_type = FILES[name]
    body = resources.files(__package__).joinpath(filename).read_bytes()
    return Response(body, media_type=media_type, headers=HEADERS)


@router.get("")
def dashboard_root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", headers=HEADERS)


@router.get("/")
def dashboard_index() -> Response:
    return _file("")


def _asset_route(name: str) -> None:
    router.add_api_route(f"/{name}", lambda: _file(name), methods=["GET"], name=f"dashboard {name}")


for _name in FILES:
    if _name:
        _asset_route(_name)
