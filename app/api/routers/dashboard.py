"""`GET /dashboard`: the live MMU dashboard (a static page; no CDN, works offline).

The page reads the REST API for history and one `GET /v1/events` stream for what follows;
its files are `app/api/static/dashboard.{html,js,css}`, served from here.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse

from app.api.routing import ApiRouter

router = ApiRouter(tags=["dashboard"], include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    return FileResponse(
        STATIC / "dashboard.html",
        media_type="text/html; charset=utf-8",
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/dashboard/dashboard.js")
async def dashboard_js() -> FileResponse:
    return _asset("dashboard.js")


@router.get("/dashboard/dashboard.css")
async def dashboard_css() -> FileResponse:
    return _asset("dashboard.css")


def _asset(name: str) -> FileResponse:
    return FileResponse(
        STATIC / name, media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"}
    )
