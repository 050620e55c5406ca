"""The dashboard as a Starlette application: read-only pages over the control plane's store.

Pages are rendered on the server with Jinja2 from the same report the
ReportService returns (`ota.reports`), so the page, the JSON and the CSV
agree. Every page but sign-in needs a session (`ota.web.sessions`); a rollout
page follows its rollout over server-sent events (`ota.web.live`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ota.api import convert
from ota.api.auth import Authenticator, Caller
from ota.clock import Clock
from ota.errors import InvalidArgument, NotFound
from ota.reports.model import build_feature_report, build_report
from ota.reports.view import build_feature_view, build_view
from ota.store.models import RolloutRow
from ota.store.session import Store
from ota.v1 import report_pb2
from ota.web import queries
from ota.web.assets import SCRIPTS, STYLES, assets, environment
from ota.web.live import LiveReports
from ota.web.sessions import COOKIE, SESSION_SECONDS, Sessions, SignInRefused

log = logging.getLogger(__name__)

# Scripts and styles come from this origin only; inline style attributes draw the bars.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_MAX_FORM_BYTES = 8192


class Dashboard:
    """The pages, and what they share: the store, sign-in sessions, live watchers."""

    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        clock: Clock,
        *,
        secure_cookies: bool,
        live_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.sessions = Sessions(auth)
        self.secure = secure_cookies
        self.live = LiveReports(store, self.render_report_fragment, interval=live_interval)
        self._env = environment()
        files = assets()
        self._asset_urls = {name: f"/static/{a.hashed}" for name, a in files.items()}
        self._by_hashed = {a.hashed: a for a in files.values()}
        self.app = Starlette(
            routes=[
                Route("/signin", self.signin_form, methods=["GET"]),
                Route("/signin", self.signin, methods=["POST"]),
                Route("/signout", self.signout, methods=["POST"]),
                Route("/", self.rollouts, methods=["GET"]),
                Route("/rollouts/{rollout_id}", self.rollout, methods=["GET"]),
                Route("/rollouts/{rollout_id}/events", self.rollout_events, methods=["GET"]),
                Route("/features/{feature}", self.feature, methods=["GET"]),
                Route("/fleet", self.fleet, methods=["GET"]),
                Route("/devices/{device_id}", self.device, methods=["GET"]),
                Route("/static/{name}", self.static, methods=["GET"]),
            ]
        )

    # -- rendering -------------------------------------------------------------

    def report(self, rollout_id: str) -> report_pb2.RolloutReport:
        with self.store.transaction() as session:
            value = build_report(session, rollout_id, self.clock.now())
        return convert.report(value, value.current_states)

    def render_report_fragment(self, rollout_id: str) -> str:
        view = build_view(self.report(rollout_id))
        return self._env.get_template("_report.html").render(view=view)

    def _page(
        self, template: str, caller: Caller | None, status: int = 200, **values: Any
    ) -> HTMLResponse:
        values = {"error": "", "next": "/", **values}
        body = self._env.get_template(template).render(
            caller=caller,
            styles=[self._asset_urls[n] for n in STYLES],
            scripts=[self._asset_urls[n] for n in SCRIPTS],
            live_script=self._asset_urls["live.js"],
            quote=quote,
            **values,
        )
        return HTMLResponse(body, status_code=status, headers=_PAGE_HEADERS)

    def _caller(self, request: Request) -> Caller | None:
        return self.sessions.caller(request.cookies.get(COOKIE))

    def _to_signin(self, request: Request) -> RedirectResponse:
        # Only the path: a query string could carry anything, and goes in no URL of ours.
        return RedirectResponse(f"/signin?next={quote(request.url.path)}", status_code=303)

    def _not_found(self, caller: Caller, what: str) -> HTMLResponse:
        return self._page("message.html", caller, status=404, title="Not found", message=what)

    # -- sign-in ---------------------------------------------------------------

    def signin_form(self, request: Request) -> Response:
        if self._caller(request) is not None:
            return RedirectResponse("/", status_code=303)
        return self._page("signin.html", None, next=_safe_next(request.query_params.get("next")))

    async def signin(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > _MAX_FORM_BYTES:
            return self._page("signin.html", None, status=413, error="the form is too large")
        form = parse_qs(body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        target = _safe_next((form.get("next") or ["/"])[0])
        try:
            sid, caller = await asyncio.to_thread(self.sessions.sign_in, token)
        except SignInRefused:
            # Never the token itself: only that a sign-in was refused, and from where.
            client = request.client.host if request.client else "?"
            log.warning("dashboard sign-in refused from %s", client)
            error = "Enter a token." if not token.strip() else "That token is not valid."
            return self._page("signin.html", None, status=401, error=error, next=target)
        log.info("dashboard sign-in: %s (%s)", caller.name, caller.role)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            sid,
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            secure=self.secure,
            samesite="strict",
        )
        return response

    def signout(self, request: Request) -> Response:
        self.sessions.sign_out(request.cookies.get(COOKIE))
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(
            COOKIE, path="/", httponly=True, secure=self.secure, samesite="strict"
        )
        return response

    # -- pages -----------------------------------------------------------------

    def rollouts(self, request: Request) -> Response:
        caller = self._caller(request)
        if caller is None:
            return self._to_signin(request)
        feature = request.query_params.get("feature", "").strip()
        state = request.query_params.get("state", "").strip()
        error = ""
        with self.store.transaction() as session:
            try:
                lines = queries.rollout_lines(session, feature=feature, state=state)
            except InvalidArgument as exc:
                lines, error = [], str(exc)
            features = queries.features(session)
        return self._page(
            "rollouts.html",
            caller,
            lines=lines,
            features=features,
            states=queries.ROLLOUT_STATES,
            feature=feature,
            state=state,
            error=error,
        )

    def rollout(self, request: Request) -> Response:
        caller = self._caller(request)
        if caller is None:
            return self._to_signin(request)
        rollout_id = request.path_params["rollout_id"]
        try:
            return self.rollout_page(rollout_id, caller)
        except NotFound:
            return self._not_found(caller, f"There is no rollout {rollout_id}.")

    def rollout_page(self, rollout_id: str, caller: Caller) -> HTMLResponse:
        """The rollout page: the report as of now, and the stream that keeps it current."""
        return self._page(
            "rollout.html",
            caller,
            view=build_view(self.report(rollout_id)),
            stream=f"/rollouts/{quote(rollout_id)}/events",
        )

    async def rollout_events(self, request: Request) -> Response:
        if self._caller(request) is None:
            return Response("sign in first", status_code=401)
        rollout_id = request.path_params["rollout_id"]
        if not await asyncio.to_thread(self._rollout_exists, rollout_id):
            return Response("no such rollout", status_code=404)
        return StreamingResponse(
            self._stream(rollout_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    def _rollout_exists(self, rollout_id: str) -> bool:
        with self.store.transaction() as session:
            return session.get(RolloutRow, rollout_id) is not None

    async def _stream(self, rollout_id: str) -> AsyncIterator[str]:
        with self.live.follow(rollout_id) as updates:
            # Following before the first byte: once the browser sees the stream open,
            # no change can slip by unannounced.
            yield "retry: 2000\n: following\n\n"
            while True:
                try:
                    html = await asyncio.wait_for(updates.get(), timeout=15.0)
                except TimeoutError:
                    yield ": keep-alive\n\n"  # proxies close silent connections
                    continue
                data = "".join(f"data: {line}\n" for line in html.split("\n"))
                yield f"event: report\n{data}\n"

    def feature(self, request: Request) -> Response:
        caller = self._caller(request)
        if caller is None:
            return self._to_signin(request)
        name = request.path_params["feature"]
        with self.store.transaction() as session:
            value = build_feature_report(session, name, self.clock.now())
        if not value.rollouts:
            return self._not_found(caller, f"No rollout of feature {name} exists.")
        view = build_feature_view(convert.feature_report(value))
        return self._page("feature.html", caller, view=view, links=_Links())

    def fleet(self, request: Request) -> Response:
        caller = self._caller(request)
        if caller is None:
            return self._to_signin(request)
        wanted = request.query_params.get("device", "").strip()
        if wanted:
            return RedirectResponse(f"/devices/{quote(wanted, safe='')}", status_code=303)
        with self.store.transaction() as session:
            counts = queries.fleet_counts(session)
        return self._page("fleet.html", caller, counts=counts)

    def device(self, request: Request) -> Response:
        caller = self._caller(request)
        if caller is None:
            return self._to_signin(request)
        device_id = request.path_params["device_id"]
        try:
            with self.store.transaction() as session:
                timeline = queries.device_timeline(session, device_id)
        except NotFound:
            return self._not_found(caller, f"There is no device {device_id}.")
        return self._page("device.html", caller, t=timeline, fmt=_fmt_time)

    def static(self, request: Request) -> Response:
        asset = self._by_hashed.get(request.path_params["name"])
        if asset is None:
            return Response("not found", status_code=404)
        return Response(
            asset.body,
            media_type=asset.content_type,
            headers={
                "Cache-Control": "public, max-age=31536000, immutable",
                "X-Content-Type-Options": "nosniff",
            },
        )


class _Links:
    @staticmethod
    def rollout(rollout_id: str) -> str:
        return f"/rollouts/{quote(rollout_id)}"


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never another origin, never a query string."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target.split("?", 1)[0]


def _fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"
