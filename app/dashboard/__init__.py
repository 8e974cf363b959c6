"""The dashboard: a static single-page app served by the service itself (no CDN, no build step).

:data:`router` serves the page at ``/`` and its files under ``/dashboard/static/``; the page talks to
the ``/v1`` API from the browser.
"""

from app.dashboard.router import STATIC_DIR, router

__all__ = ["STATIC_DIR", "router"]
