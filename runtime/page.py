"""The playground page the server shows at ``GET /``: plain HTML, CSS and JavaScript shipped as
package data (``runtime/static``), no build step, nothing fetched from elsewhere.

The page posts to ``POST /edit`` with ``Accept: text/event-stream`` (progress, then the answer)
and reads ``GET /healthz`` (engine folder, body limits). Every file is read once from the
package into memory: a request picks one of them by name and never reaches the file system.
Each answer carries a Content-Security-Policy that lets the page load its own script, style and
data (and ``data:``/``blob:`` images: the answers' PNGs, a picked file) and nothing else.
"""

from __future__ import annotations

import functools
from importlib.resources import files

from starlette.responses import Response

#: The page's files and their media types.
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _contents() -> dict[str, bytes]:
    folder = files("adapedit.runtime") / "static"
    return {name: (folder / name).read_bytes() for name in PAGE_FILES}


def page_response(name: str) -> Response | None:
    """The page's file ``name`` (one of :data:`PAGE_FILES`) with its security headers; None for
    any other name."""
    body = _contents().get(name)
    if body is None:
        return None
    return Response(body, 200, HEADERS, media_type=PAGE_FILES[name])
