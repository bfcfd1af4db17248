"""The web dashboard: ``mqueue.web.app(database)`` is a WSGI application, ``mqueue web`` serves it.

Standard library only (``wsgiref``, ``html``, ``hmac``): it mounts in any
WSGI host (Flask, Django, gunicorn) or, through a WSGI middleware, an ASGI
one (FastAPI).  Every read and every action goes through ``mqueue.admin``;
this package holds no SQL.

e.g.::

    from mqueue.web import app
    dashboard = app("postgresql+psycopg://app@db/app", read_only=True)

Modules: ``application`` (routing, authentication, errors), ``forms``
(CSRF tokens), ``pages`` (HTML), ``svg`` (charts), ``metrics`` (Prometheus
text), ``server`` (the threaded ``wsgiref`` server of ``mqueue web``).
"""

from __future__ import annotations

from .application import Dashboard, app
from .server import serve

__all__ = ["Dashboard", "app", "serve"]
