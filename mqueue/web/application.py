"""The dashboard as a WSGI application: routing, basic auth, CSRF checks, and errors as pages.

e.g.::

    from mqueue.web import app
    application = app("sqlite:///app.db")          # any WSGI server, or mounted (README)

GET pages read through ``mqueue.admin``; actions are POST forms that carry
a CSRF token (``forms.py``) and end in a redirect back (303), so reloading
a page never repeats an action.  What goes wrong becomes a page with one
line: an unknown job 404, a bad parameter 400, a refused action 409 (the job
is running, finished, ...), a missing or wrong token 403, and a database
that cannot be reached (or has no tables) 503; the application keeps
serving, and the next request tries the database again.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hmac
import importlib.resources
import logging
import os
import re
from http.cookies import CookieError, SimpleCookie
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, urlencode

from sqlalchemy.exc import InterfaceError, OperationalError, TimeoutError as PoolTimeoutError

from .. import admin
from ..cli import MAX_PRIORITY, one_line
from ..errors import (AccessDeniedError, DatabaseUnavailableError, InvalidStateError, JobNotFoundError,
                      SchemaMissingError, UnknownTaskError)
from ..registry import MAX_TAG_LENGTH
from ..schema import STATES
from ..session import Database, as_database
from . import metrics, pages
from .forms import COOKIE, FIELD, Csrf

log = logging.getLogger("mqueue.web")

#: ``MQUEUE_WEB_PASSWORD``: when set, every page asks for it (HTTP basic auth, any user name).
ENV_PASSWORD = "MQUEUE_WEB_PASSWORD"
#: A POST body larger than this is refused (the forms send a few hundred bytes).
MAX_FORM_BYTES = 64 * 1024
#: Largest job id (64-bit) and page number accepted.
MAX_ID = 2 ** 63 - 1
MAX_PAGE = 200
MAX_REFRESH_SECONDS = 3600
STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
#: Errors that mean the database cannot answer now: a 503, and the next request tries again.
OUTAGES = (DatabaseUnavailableError, SchemaMissingError, AccessDeniedError, OperationalError, InterfaceError,
           PoolTimeoutError)
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"), ("Referrer-Policy", "same-origin"),
]

JOB_PAGE = re.compile(r"^/jobs/([0-9]{1,19})$")
JOB_ACTION = re.compile(r"^/jobs/([0-9]{1,19})/([a-z]+)$")


class HTTPError(Exception):
    """Ends a request with ``status`` and a one-line page."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Response:
    status: str
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class Request:
    """What the dashboard reads from a WSGI environ (paths and query decoded as UTF-8)."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET").upper()
        self.path = _text(environ.get("PATH_INFO", "")) or "/"
        self.base = _text(environ.get("SCRIPT_NAME", "")).rstrip("/")
        self.query = {key: values[-1] for key, values in
                      parse_qs(_text(environ.get("QUERY_STRING", "")), keep_blank_values=True).items()}
        cookies = SimpleCookie()
        try:
            cookies.load(environ.get("HTTP_COOKIE", ""))
        except CookieError:
            pass
        self.csrf_cookie = cookies[COOKIE].value if COOKIE in cookies else None
        self._form: dict[str, str] | None = None

    @property
    def form(self) -> dict[str, str]:
        """The urlencoded POST body, read once."""
        if self._form is None:
            try:
                length = int(self.environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if length > MAX_FORM_BYTES:
                raise HTTPError("413 Content Too Large", "form too large")
            body = self.environ["wsgi.input"].read(length) if length > 0 else b""
            self._form = {key: values[-1] for key, values in
                          parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        return self._form


def _text(value: str) -> str:
    """A WSGI string (bytes as latin-1) as the UTF-8 text the client meant."""
    try:
        return value.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # already text (a caller that built its own environ)
        return value


class Dashboard:
    """The WSGI application returned by ``app()``; one instance serves any number of threads."""

    def __init__(self, database: "Database | str", read_only: bool = False, password: str | None = None,
                 secret: bytes | str | None = None) -> None:
        self.db = as_database(database)
        self.read_only = read_only
        self.password = password if password is not None else (os.environ.get(ENV_PASSWORD) or None)
        self.csrf = Csrf(secret)

    # -- WSGI ---------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self.handle(request)
        except Exception:  # noqa: BLE001 - a bug must not take the server down; it is logged in full
            log.exception("dashboard request %s %s failed", request.method, request.path)
            response = self.page(request, None, "500 Internal Server Error", "Error",
                                 pages.message_page(self.view(request, None), "internal error: see the server log"))
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
                   *SECURITY_HEADERS, *response.headers]
        if not any(name == "Cache-Control" for name, _ in headers):
            headers.append(("Cache-Control", "no-store"))
        start_response(response.status, headers)
        return [b""] if request.method == "HEAD" else [response.body]

    def handle(self, request: Request) -> Response:
        if request.path == "/healthz":
            return self.healthz()
        if self.password is not None and not self.authorized(request):
            return Response("401 Unauthorized", b"password required\n", "text/plain; charset=utf-8",
                            [("WWW-Authenticate", 'Basic realm="mqueue", charset="UTF-8"')])
        if request.path.startswith("/static/"):
            return self.static(request.path[len("/static/"):])
        cookie = request.csrf_cookie if Csrf.usable(request.csrf_cookie) else None
        new_cookie = None
        if cookie is None:
            cookie = new_cookie = Csrf.new_cookie()
        try:
            if request.method == "POST":
                response = self.post(request)
            elif request.method in ("GET", "HEAD"):
                response = self.get(request, cookie)
            else:
                response = Response("405 Method Not Allowed", b"GET, HEAD or POST\n", "text/plain; charset=utf-8",
                                    [("Allow", "GET, HEAD, POST")])
        except HTTPError as error:
            response = self.problem(request, cookie, error.status, str(error))
        except JobNotFoundError as error:
            response = self.problem(request, cookie, "404 Not Found", str(error))
        except OUTAGES as error:
            log.warning("dashboard: database unavailable: %s", one_line(error))
            response = self.problem(request, cookie, "503 Service Unavailable",
                                    f"database unavailable: {one_line(error)}")
        if new_cookie is not None:
            response.headers.append(Csrf.set_cookie_header(new_cookie, request.base or "/"))
        return response

    def authorized(self, request: Request) -> bool:
        scheme, _, encoded = request.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            _user, _, given = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(given.encode(), self.password.encode())

    # -- responses ------------------------------------------------------------------
    def view(self, request: Request, cookie: str | None) -> pages.View:
        token = None if self.read_only or cookie is None else self.csrf.token(cookie)
        refresh = request.query.get("refresh", "")
        seconds = int(refresh) if refresh.isdigit() and 0 < int(refresh) <= MAX_REFRESH_SECONDS else None
        done = pages.DONE.get(request.query.get("done", ""))
        count = request.query.get("n", "")
        if done is not None:
            done = done.format(n=int(count) if count.isdigit() else 0)
        return pages.View(request.base, token, seconds, done, self.db.safe_url)

    def page(self, request: Request, cookie: str | None, status: str, title: str, body: str) -> Response:
        return Response(status, pages.layout(self.view(request, cookie), title, body).encode())

    def problem(self, request: Request, cookie: str | None, status: str, message: str) -> Response:
        view = dataclasses.replace(self.view(request, cookie), refresh=None)
        title = status.partition(" ")[2]
        return Response(status, pages.layout(view, title, pages.message_page(view, message)).encode())

    def redirect(self, request: Request, path: str, done: str, count: int | None = None) -> Response:
        query = urlencode({"done": done, **({"n": count} if count is not None else {})})
        return Response("303 See Other", b"", "text/plain; charset=utf-8",
                        [("Location", f"{request.base}{path}?{query}")])

    def static(self, name: str) -> Response:
        if name not in STATIC:
            return Response("404 Not Found", b"not found\n", "text/plain; charset=utf-8")
        body = importlib.resources.files(__package__).joinpath("static", name).read_bytes()
        return Response("200 OK", body, STATIC[name], [("Cache-Control", "max-age=3600")])

    def healthz(self) -> Response:
        """``ok`` while the database answers (no password asked: it says nothing else)."""
        try:
            admin.get_config(self.db)
        except OUTAGES as error:
            return Response("503 Service Unavailable", f"database unavailable: {one_line(error)}\n".encode(),
                            "text/plain; charset=utf-8")
        return Response("200 OK", b"ok\n", "text/plain; charset=utf-8")

    # -- GET ----------------------------------------------------------------------------
    def get(self, request: Request, cookie: str) -> Response:
        path, q = request.path, request.query
        view = self.view(request, cookie)

        def html(title: str, body: str) -> Response:
            return Response("200 OK", pages.layout(view, title, body).encode())

        if path == "/":
            queues = admin.stats(self.db)
            return html("Queues", pages.overview(view, queues, admin.throughput(self.db)))
        if path == "/queue":
            name = queue_param(q.get("name"))
            state = q.get("state") or "queued"
            if state not in STATES:
                raise HTTPError("400 Bad Request", f"unknown state {state!r}; choose from {', '.join(STATES)}")
            page = int_param(q, "page", 1, MAX_PAGE)
            jobs = admin.list_jobs(self.db, queue=name, state=state, limit=page * pages.PAGE_SIZE + 1)
            counts = next((stats for stats in admin.stats(self.db, [name]) if stats.queue == name), None)
            return html(f"Queue {name}", pages.queue_page(view, name, state, page,
                                                          jobs[(page - 1) * pages.PAGE_SIZE:], counts))
        match = JOB_PAGE.match(path)
        if match:
            job = admin.get_job(self.db, job_id_param(match.group(1)))
            return html(f"Job {job.id}", pages.job_page(view, job))
        if path == "/failed":
            queue = queue_param(q["queue"]) if q.get("queue") else None
            return html("Failed jobs", pages.failed_page(view, admin.failed_groups(self.db, queue), queue))
        if path == "/tracked":
            return html("Tracked jobs", pages.tracked_page(view, admin.tracked_jobs(self.db, limit=200)))
        if path == "/tags":
            tag = q.get("tag") or None
            if tag is not None and len(tag) > MAX_TAG_LENGTH:
                raise HTTPError("400 Bad Request", f"a tag has 1 to {MAX_TAG_LENGTH} characters")
            jobs = admin.jobs_tagged(self.db, tag, limit=200) if tag else []
            return html("Tags", pages.tags_page(view, tag, jobs))
        if path == "/workers":
            return html("Workers", pages.workers_page(view, admin.list_workers(self.db)))
        if path == "/crons":
            return html("Crons", pages.crons_page(view, admin.list_crons(self.db)))
        if path == "/stats":
            names = [stats.queue for stats in admin.stats(self.db)]
            queue = queue_param(q["queue"]) if q.get("queue") else (names[0] if names else None)
            day = day_param(q.get("day"))
            stats = admin.queue_stats(self.db, queue, day) if queue is not None else None
            if queue is not None and queue not in names:
                names.append(queue)
            return html("Stats", pages.stats_page(view, names, queue, stats.day if stats else day, stats))
        if path == "/metrics":
            return Response("200 OK", metrics.render(self.db).encode(), metrics.CONTENT_TYPE)
        raise HTTPError("404 Not Found", f"no page {path}")

    # -- POST ------------------------------------------------------------------------------
    def post(self, request: Request) -> Response:
        if self.read_only:
            raise HTTPError("403 Forbidden", "this dashboard is read-only: actions are disabled")
        form = request.form
        if not self.csrf.valid(request.csrf_cookie, form.get(FIELD)):
            raise HTTPError("403 Forbidden", "missing or wrong CSRF token: reload the page and try again")
        try:
            return self.act(request, form)
        except (InvalidStateError, UnknownTaskError) as error:
            raise HTTPError("409 Conflict", one_line(error)) from None
        except (ValueError, TypeError) as error:
            raise HTTPError("400 Bad Request", one_line(error)) from None

    def act(self, request: Request, form: dict[str, str]) -> Response:
        path = request.path
        match = JOB_ACTION.match(path)
        if match:
            job_id, action = job_id_param(match.group(1)), match.group(2)
            back = f"/jobs/{job_id}"
            if action == "retry":
                admin.retry_job(self.db, job_id)
                return self.redirect(request, back, "retried")
            if action == "cancel":
                cascade = form.get("cascade") == "1"
                admin.cancel_job(self.db, job_id, cascade=cascade)
                return self.redirect(request, back, "canceled-cascade" if cascade else "canceled")
            if action == "move":
                admin.move_job(self.db, job_id, queue_param(form.get("queue", "").strip()))
                return self.redirect(request, back, "moved")
            if action == "priority":
                admin.set_priority(self.db, job_id, priority_param(form_text(form, "priority")))
                return self.redirect(request, back, "priority")
            if action == "tag":
                admin.tag_job(self.db, job_id, form_text(form, "tag"))  # one tag, spaces and all
                return self.redirect(request, back, "tagged")
            if action == "untag":
                admin.untag_job(self.db, job_id, form_text(form, "tag"))
                return self.redirect(request, back, "untagged")
            if action in ("track", "untrack"):
                admin.track_job(self.db, job_id, tracked=action == "track")
                return self.redirect(request, back, f"{action}ed")
        if path in ("/queues/pause", "/queues/resume"):
            queue = queue_param(form.get("queue"))
            if path == "/queues/pause":
                admin.pause_queue(self.db, queue)
                return self.redirect(request, "/", "paused")
            admin.resume_queue(self.db, queue)
            return self.redirect(request, "/", "resumed")
        if path in ("/failed/retry", "/failed/cancel"):
            queue, error = queue_param(form.get("queue")), form_text(form, "error")
            if path == "/failed/retry":
                return self.redirect(request, "/failed", "group-retried",
                                     admin.retry_failed_group(self.db, queue, error))
            return self.redirect(request, "/failed", "group-canceled", admin.cancel_failed_group(self.db, queue, error))
        raise HTTPError("404 Not Found", f"no action {path}")


# -- parameters ----------------------------------------------------------------------------

def queue_param(value: str | None) -> str:
    if not value or len(value) > 100:
        raise HTTPError("400 Bad Request", "a queue name of 1 to 100 characters is required")
    return value


def job_id_param(text: str) -> int:
    value = int(text)
    if not 0 < value <= MAX_ID:
        raise JobNotFoundError(f"no job {text}")
    return value


def priority_param(text: str) -> int:
    """A priority as ``mqueue priority`` takes it: a 32-bit integer (its negation is stored too)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -MAX_PRIORITY <= value <= MAX_PRIORITY:
        raise HTTPError("400 Bad Request", f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY}, "
                                           f"got {text[:20]!r}")
    return value


def int_param(query: dict[str, str], name: str, default: int, highest: int) -> int:
    text = query.get(name)
    if not text:
        return default
    if not text.isdigit() or not 1 <= int(text) <= highest:
        raise HTTPError("400 Bad Request", f"{name} must be a whole number from 1 to {highest}, got {text[:20]!r}")
    return int(text)


def day_param(text: str | None) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise HTTPError("400 Bad Request", f"day must be YYYY-MM-DD, got {text[:20]!r}") from None


def form_text(form: dict[str, str], name: str) -> str:
    value = form.get(name, "").strip()
    if not value:
        raise HTTPError("400 Bad Request", f"the form field {name} is required")
    return value


def app(database: "Database | str", read_only: bool = False, password: str | None = None,
        secret: bytes | str | None = None) -> Dashboard:
    """The dashboard as a WSGI application on ``database`` (a ``Database`` or URL).

    ``read_only`` shows no forms and refuses every POST.  ``password``
    (default: ``$MQUEUE_WEB_PASSWORD``) turns on HTTP basic auth for every
    page (any user name).  ``secret`` signs CSRF tokens: give the same one
    to every process that serves one dashboard (default: random per call).
    """
    return Dashboard(database, read_only=read_only, password=password, secret=secret)
