"""The dashboard's test rig: a WSGI client that keeps cookies and CSRF tokens, and the tasks
whose jobs the pages show.

``client`` calls the application in-process with environs built by
``wsgiref.util.setup_testing_defaults``: the same code path a WSGI server
takes, without a socket.  Jobs are real rows on the test's backend, run by
a real in-process worker (``run_until_empty``).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from typing import Any
from urllib.parse import urlencode, urlsplit
from wsgiref.util import setup_testing_defaults

import pytest

import mqueue

QUEUE = "tweb"
OTHER_QUEUE = "tweb-other"
#: Only the crons test's scheduler serves this queue.
CRON_QUEUE = "tweb-cron"
#: Flipped by tests: while True, ``flaky`` fails.
FLAKY = {"fail": True}


@mqueue.task(name="tweb.ok", queue=QUEUE)
def ok(n: int = 0, text: str = "") -> None:
    """Succeeds."""


@mqueue.task(name="tweb.broken", queue=QUEUE, max_retries=0)
def broken(text: str = "") -> None:
    raise RuntimeError(f"smtp refused {text}")


@mqueue.task(name="tweb.timeout", queue=QUEUE, max_retries=0)
def times_out() -> None:
    raise TimeoutError("the remote end hung")


@mqueue.task(name="tweb.flaky", queue=QUEUE, max_retries=0)
def flaky() -> None:
    if FLAKY["fail"]:
        raise ConnectionError("payment service down")


@mqueue.cron("*/5 * * * *", name="tweb.report", queue=CRON_QUEUE)
def report() -> None:
    """A cron for the crons page."""


@pytest.fixture(autouse=True)
def _flaky_fails_again():
    FLAKY["fail"] = True
    yield
    FLAKY["fail"] = True


def run_queue(db, queue: str = QUEUE) -> Any:
    """Run every due job of ``queue`` in a real worker, here and now; the counts of what ran."""
    return mqueue.Worker(db, queues=[queue], poll_interval=0.05, lease=10).run_until_empty(timeout=30)


@dataclasses.dataclass
class Result:
    status: int
    headers: dict[str, str]
    text: str

    def token(self) -> str:
        """The CSRF token of the page's forms."""
        match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', self.text)
        assert match, "the page has no form with a CSRF token"
        return match.group(1)


class Client:
    """Calls a WSGI application as a browser would: cookies kept, POSTs with the page's token."""

    def __init__(self, application, script_name: str = "", password: str | None = None) -> None:
        self.application = application
        self.script_name = script_name
        self.cookies: dict[str, str] = {}
        self.password = password
        self.token: str | None = None

    def request(self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Result:
        parts = urlsplit(target)
        environ: dict[str, Any] = {"REQUEST_METHOD": method, "SCRIPT_NAME": self.script_name,
                                   "PATH_INFO": parts.path.encode("utf-8").decode("latin-1"),
                                   "QUERY_STRING": parts.query, "wsgi.input": io.BytesIO(body),
                                   "CONTENT_LENGTH": str(len(body))}
        if method == "POST":
            environ["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
        if self.cookies:
            environ["HTTP_COOKIE"] = "; ".join(f"{key}={value}" for key, value in self.cookies.items())
        if self.password is not None:
            environ["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(f"ops:{self.password}".encode()).decode()
        for name, value in (headers or {}).items():
            environ[name] = value
        setup_testing_defaults(environ)
        captured: dict[str, Any] = {}

        def start_response(status, response_headers, exc_info=None):
            captured["status"], captured["headers"] = status, response_headers

        chunks = self.application(environ, start_response)
        text = b"".join(chunks).decode("utf-8")
        for name, value in captured["headers"]:
            if name == "Set-Cookie":
                key, _, rest = value.partition("=")
                self.cookies[key] = rest.partition(";")[0]
        result = Result(int(captured["status"].split()[0]), dict(captured["headers"]), text)
        if 'name="csrf_token"' in text:
            self.token = result.token()
        return result

    def get(self, target: str, **headers: str) -> Result:
        return self.request("GET", target, headers=headers)

    def post(self, target: str, data: dict[str, Any] | None = None, token: bool = True) -> Result:
        """POST a form; with ``token`` the CSRF token of the last page seen is added."""
        fields = dict(data or {})
        if token:
            assert self.token is not None, "GET a page with forms first"
            fields.setdefault("csrf_token", self.token)
        return self.request("POST", target, urlencode(fields).encode())


@pytest.fixture(autouse=True)
def _no_password_from_the_environment(monkeypatch):
    monkeypatch.delenv("MQUEUE_WEB_PASSWORD", raising=False)


@pytest.fixture
def client(db) -> Client:
    from mqueue.web import app
    return Client(app(db))


def enqueue(db, task, **options_and_args) -> int:
    options = {key: options_and_args.pop(key) for key in ("tags", "delay", "priority", "queue")
               if key in options_and_args}
    with db.session():
        return task.options(**options).enqueue(**options_and_args)
