"""Interactive API docs served from the app itself: Swagger UI at `/docs`, Redoc at `/redoc`,
their scripts and styles from the `fastapi-offline` package's assets, so the pages work on a
machine without internet (no CDN).

The pages and `/openapi.json` follow the API's rule (a token, from the header or the
`vkmmu_token` cookie); the assets are the packages' own files and stay open."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from app.api.auth import authorize_page

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"


SPEC_URL = "/openapi.json"


def install_docs(app: FastAPI) -> None:
    """Needs `FastAPI(docs_url=None, redoc_url=None, openapi_url=None)`: these routes replace
    FastAPI's own ones (CDN pages, an open spec)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    spec_url = SPEC_URL
    page_auth = [Depends(authorize_page)]

    @app.get(SPEC_URL, include_in_schema=False, dependencies=page_auth)
    async def openapi_spec() -> Any:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=page_auth)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=spec_url,
            title=f"{app.title} — API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False, dependencies=page_auth)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=spec_url,
            title=f"{app.title} — API reference",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
