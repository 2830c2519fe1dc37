"""The inspector: a static page at `GET /ui` that draws a zone's session tree and delegation graph
(api/ui/). The page and its assets hold no data and are public; the page asks for the operator
token and sends it as the bearer of every API call it makes. `GET /ui/config.json` tells it where
the Temporal Web UI is (`TEMPORAL_UI_URL`), to link each session to its workflow."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
ASSETS_PREFIX = "/ui/assets"

# The page runs only its own scripts and talks only to this origin; it is never framed.
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["inspector"], include_in_schema=False)


@router.get("/ui")
async def inspector_page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/ui/config.json")
async def inspector_config(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    return JSONResponse({"temporal_ui_url": settings.TEMPORAL_UI_URL.rstrip("/"),
                         "temporal_namespace": settings.TEMPORAL_NAMESPACE},
                        headers={"Cache-Control": "no-cache"})


def mount_inspector(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(ASSETS_PREFIX, StaticFiles(directory=UI_DIR / "assets"), name="inspector-assets")
