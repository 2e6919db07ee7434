"""/docs (Swagger UI) and /redoc with their scripts served by this server, not a CDN: the project runs
offline, where FastAPI's default pages stay blank. The assets come from the `fastapi-offline` wheel
(pinned in requirements.txt); only its files are used, the app is still ours.

Each page also carries a Content-Security-Policy that allows this server only: ReDoc's side menu asks
for its maker's logo from their CDN whatever the options, and the browser refuses that request instead
of sending it (the menu then shows no logo)."""

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from backend.api.security import Access, guard

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs-assets"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def same_origin_only(page: HTMLResponse) -> HTMLResponse:
    """`page` with a policy that lets it load from this server only; its inline scripts allowed by hash.
    Inline styles and blob: workers stay allowed: both UIs need them, and neither reaches the network."""
    scripts = _INLINE_SCRIPT.findall(bytes(page.body).decode())
    hashes = "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    page.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "font-src 'self' data:; worker-src 'self' blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return page


def install_docs_pages(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """Serve /docs and /redoc from local files; create the app with docs_url=None, redoc_url=None."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    favicon = f"{ASSETS_URL}/favicon.png"

    @app.get("/docs", include_in_schema=False, dependencies=[guard(Access.PUBLIC)])
    async def swagger_ui() -> HTMLResponse:
        return same_origin_only(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=favicon,
                # No badge that sends the schema to swagger.io's online validator.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @app.get("/redoc", include_in_schema=False, dependencies=[guard(Access.PUBLIC)])
    async def redoc() -> HTMLResponse:
        return same_origin_only(
            get_redoc_html(
                openapi_url=openapi_url,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=favicon,
                with_google_fonts=False,
            )
        )
