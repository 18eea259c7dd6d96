"""The console's routes: server-rendered pages at ``/console`` behind the admin credential.

One ``Router`` whose ``before_request`` hook lets in a valid session cookie or an admin
``Authorization: Bearer`` key: a page without either redirects to the login form, an action
answers 401, and a form post from a session without its CSRF token answers 403. Moves go through
``gateway.api.tasks.move_task`` and policy edits through ``router.policy`` exactly as the admin
API and ``distillgate policy check`` do; the routes only translate forms into those calls.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode

import jinja2
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie, State
from litestar.di import Provide
from litestar.response import Redirect

from gateway.api.tasks import move_task
from gateway.auth import KeyRing
from gateway.console import plots
from gateway.console.diff import answer_text, is_json, side_by_side
from gateway.console.policy_edit import NoPolicyFile, apply_task_section, task_section
from gateway.console.session import COOKIE, LOGIN_COOKIE, Session, Sessions, login_token
from gateway.console.views import SORTABLE, overview, sorted_overview, task_page
from gateway.errors import GatewayError, error_bytes
from gateway.store.db import Database
from gateway.store.models import Stage
from gateway.store.queries import RecordSearch, record, search_records
from gateway.task_table import TaskTable
from router.policy import PolicyError, policy_summary
from router.policy_store import PolicyStore
from router.promotion import Promoter
from router.stages import UnknownTask
from router.tasks import ACTIONS, Action, UnknownAdapter, recent_pairs, shadow_pair

HERE = Path(__file__).parent
STATIC: Final = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
SOURCE = "console"
PAGE_SIZE = 50
HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "Referrer-Policy": "same-origin",
}
DONE: Final = {
    "promote": "Promoted.",
    "rollback": "Rolled back: the teacher answers the task.",
    "pause": "Paused: the teacher answers the task.",
    "resume": "Resumed.",
    "transition": "Moved.",
    "policy": "Policy section saved and reloaded.",
}
_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
NONE = "\u2013"  # an en dash where there is no number yet
_templates.filters["pct"] = lambda v: NONE if v is None else f"{100 * v:.1f}%"
_templates.filters["num"] = lambda v, d=3: NONE if v is None else f"{v:.{d}f}"
_templates.filters["usd"] = lambda v: f"${v:,.4f}"
_templates.filters["ms"] = lambda v: NONE if v is None else f"{v:.0f} ms"
_templates.filters["pretty"] = lambda v: json.dumps(
    v, indent=2, sort_keys=True, ensure_ascii=False, default=str
)
_templates.filters["when"] = lambda v: str(v)[:19].replace("T", " ")


Caller = Session | str
"""A session, or ``bearer`` for a request carrying the admin key itself."""


def _secure(request: Request[Any, Any, Any]) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "") == "https"


def _page(
    request: Request[Any, Any, Any],
    name: str,
    status: int = 200,
    cookies: list[Cookie] | None = None,
    **ctx: Any,
) -> Response[str]:
    caller: Caller | None = getattr(request.state, "console_caller", None)
    sessions: Sessions = request.state.console_sessions
    ctx.setdefault("notice", DONE.get(str(request.query_params.get("done", ""))))
    html = _templates.get_template(name).render(
        who=caller.subject if isinstance(caller, Session) else ("admin key" if caller else None),
        csrf=sessions.csrf(caller) if isinstance(caller, Session) else "",
        path=request.url.path,
        **ctx,
    )
    return Response(html, status_code=status, media_type="text/html", headers=HEADERS, cookies=cookies or [])


_CODES: Final = {401: "missing_session", 403: "permission_denied"}


def _refused(status: int, message: str, code: str | None = None) -> Response[bytes]:
    """A refused request, shaped as every gateway error is (``{"error": {...}}``)."""
    body = error_bytes(message, "invalid_request_error", None, code or _CODES.get(status))
    return Response(body, status_code=status, media_type="application/json", headers=HEADERS)


async def _caller(request: Request[Any, Any, Any], sessions: Sessions) -> Caller | Response[bytes] | None:
    header = request.headers.get("authorization")
    if header:
        keys: KeyRing = request.app.state.parts.keys
        try:
            who = await keys.authenticate(header)
        except GatewayError as exc:
            return Response(
                exc.to_bytes(), status_code=exc.status, media_type="application/json", headers=HEADERS
            )
        return "bearer" if who.admin else _refused(403, "The console needs the admin credential.")
    session = sessions.read(request.cookies.get(COOKIE))
    if session is not None and session.subject.startswith("key-"):
        keys = request.app.state.parts.keys
        key_id = session.subject.removeprefix("key-")
        if not key_id.isdigit() or not keys.holds_admin(int(key_id)):
            return None  # the admin key it was opened with is revoked
    return session


def gatekeeper(sessions: Sessions) -> Any:
    """The console router's ``before_request``: who may see pages and post forms."""

    async def before(request: Request[Any, Any, Any]) -> Response[bytes] | Redirect | None:
        request.state.console_sessions = sessions
        path = request.url.path
        if path.startswith("/console/static/") or path == "/console/login":
            return None
        caller = await _caller(request, sessions)
        if isinstance(caller, Response):
            return caller
        if caller is None:
            if request.method in ("GET", "HEAD"):
                target = path + (f"?{request.url.query}" if request.url.query else "")
                return Redirect(f"/console/login?next={quote(target, safe='')}", status_code=303)
            return _refused(401, "Log in to the console first.")
        if request.method == "POST" and isinstance(caller, Session):
            form = await request.form()
            if not sessions.csrf_ok(caller, form.get("csrf")):
                return _refused(
                    403,
                    "This form has no valid CSRF token; reload the page and try again.",
                    "invalid_csrf_token",
                )
        request.state.console_caller = caller
        return None

    return before


# -- login ---------------------------------------------------------------------------------------
def _next(value: Any) -> str:
    text = str(value or "")
    return text if text.startswith("/console") and not text.startswith("//") else "/console/tasks"


@get("/login")
async def login_form(request: Request[Any, Any, Any]) -> Response[str]:
    token = login_token()
    cookie = Cookie(
        key=LOGIN_COOKIE,
        value=token,
        path="/console/login",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    nxt = _next(request.query_params.get("next"))
    return _page(request, "login.html", cookies=[cookie], login_csrf=token, next=nxt, error=None)


@post("/login")
async def login(request: Request[Any, Any, Any]) -> Response[str] | Response[bytes] | Redirect:
    form = await request.form()
    token = request.cookies.get(LOGIN_COOKIE)
    if not token or form.get("csrf") != token:
        return _refused(
            403,
            "This login form has no valid CSRF token; reload the page and try again.",
            "invalid_csrf_token",
        )
    keys: KeyRing = request.app.state.parts.keys
    sessions: Sessions = request.state.console_sessions
    key = str(form.get("key") or "").strip()
    try:
        who = await keys.authenticate(f"Bearer {key}") if key else None
    except GatewayError:
        who = None
    nxt = _next(form.get("next"))
    if who is None or not who.admin:
        fresh = login_token()
        cookie = Cookie(
            key=LOGIN_COOKIE,
            value=fresh,
            path="/console/login",
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
        error = "That key is not the admin credential."
        return _page(request, "login.html", 401, cookies=[cookie], login_csrf=fresh, next=nxt, error=error)
    subject = "admin" if who.key_id is None else f"key-{who.key_id}"
    session = Cookie(
        key=COOKIE,
        value=sessions.issue(subject),
        path="/console",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        max_age=int(sessions.ttl_s),
    )
    gone = Cookie(
        key=LOGIN_COOKIE, value="", path="/console/login", max_age=0, httponly=True, samesite="strict"
    )
    return Redirect(nxt, status_code=303, cookies=[session, gone], headers=HEADERS)


@post("/logout")
async def logout() -> Redirect:
    gone = Cookie(key=COOKIE, value="", path="/console", max_age=0, httponly=True, samesite="strict")
    return Redirect("/console/login", status_code=303, cookies=[gone], headers=HEADERS)


@get("/static/{name:str}")
async def static(name: str) -> Response[bytes]:
    if name not in STATIC:
        return Response(b"not found", status_code=404, media_type="text/plain")
    body = await asyncio.to_thread((HERE / "static" / name).read_bytes)
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})


# -- tasks ---------------------------------------------------------------------------------------
@get("/")
async def home() -> Redirect:
    return Redirect("/console/tasks", status_code=303)


@get("/tasks")
async def tasks_page(request: Request[Any, Any, Any], db: Database) -> Response[str]:
    sort = str(request.query_params.get("sort", "task"))
    descending = request.query_params.get("dir") == "desc"
    rows = sorted_overview(await asyncio.to_thread(overview, db), sort, descending)
    return _page(request, "tasks.html", rows=rows, sort=sort, descending=descending, columns=SORTABLE)


def _charts(page: Any, canary: list[float], threshold: float | None) -> dict[str, str]:
    marks = [(threshold, f"threshold {threshold}")] if threshold is not None else []
    charts = {
        "agreement": plots.render(
            plots.Chart(
                "Agreement with the teacher (rolling pass rate, current adapter)",
                "pair",
                "pass rate",
                [plots.Series("pass rate", page.agreement)],
                y_range=(0.0, 1.0),
                marks=marks,
            )
        ),
        "share": plots.render(
            plots.Chart(
                "Student share of traffic over stage and canary steps",
                "seconds since the first transition",
                "share",
                [plots.Series("student share", page.shares, css="s2", step=True)],
                y_range=(0.0, 1.0),
                marks=[(s, f"step {i}") for i, s in enumerate(canary)],
            )
        ),
    }
    run = next((r for r in page.runs if r.train_losses), None)
    charts["loss"] = plots.render(
        plots.Chart(
            f"Loss, training run {run.id}" if run else "Loss",
            "optimizer step",
            "loss",
            [
                plots.Series("train", run.train_losses if run else []),
                plots.Series("held-out", run.eval_losses if run else [], css="s3"),
            ],
        )
    )
    return charts


async def _task_page(
    request: Request[Any, Any, Any],
    db: Database,
    promoter: Promoter,
    policy_store: PolicyStore | None,
    task: str,
    status: int = 200,
    error: str | None = None,
) -> Response[str]:
    try:
        page = await asyncio.to_thread(task_page, db, promoter, task)
        pairs = await asyncio.to_thread(recent_pairs, db, task, 12)
    except UnknownTask:
        return _page(request, "missing.html", 404, what=f"No task '{task}'.")
    tp = policy_store.policy.for_task(task) if policy_store is not None else None
    canary = list(tp.canary) if tp is not None else []
    shown = [(p, answer_text(p.teacher_response), answer_text(p.student_response)) for p in pairs]
    return _page(
        request,
        "task.html",
        status,
        task=task,
        page=page,
        pairs=shown,
        charts=_charts(page, canary, tp.promote.threshold if tp is not None else None),
        stages=[s.value for s in Stage],
        actions=ACTIONS,
        error=error,
    )


@get("/tasks/{task:str}")
async def task_view(
    request: Request[Any, Any, Any],
    db: Database,
    promoter: Promoter,
    policy_store: PolicyStore | None,
    task: str,
) -> Response[str]:
    return await _task_page(request, db, promoter, policy_store, task)


def _form_text(form: Any, name: str) -> str | None:
    value = str(form.get(name) or "").strip()
    return value or None


@post("/tasks/{task:str}/act")
async def act(
    request: Request[Any, Any, Any],
    db: Database,
    tasks: TaskTable,
    promoter: Promoter,
    policy_store: PolicyStore | None,
    task: str,
) -> Response[str] | Redirect:
    """Promote, roll back, pause, resume (``action``), or force a stage (``action=transition``)."""
    form = await request.form()
    action = str(form.get("action") or "")
    reason = _form_text(form, "reason")
    try:
        if action in ACTIONS:
            move: Action = action
            await move_task(db, tasks, policy_store, task, move, reason, source=SOURCE)
        elif action == "transition":
            to = str(form.get("to") or "")
            if to not in {s.value for s in Stage}:
                raise _FormError(f"Pick a stage to move the task to (one of {', '.join(Stage)}).")
            step = _form_text(form, "canary_step")
            if step is not None and not step.isdigit():
                raise _FormError("The canary step is a whole number (0 for the first step).")
            await move_task(
                db,
                tasks,
                policy_store,
                task,
                Stage(to),
                reason,
                adapter=_form_text(form, "adapter"),
                canary_step=int(step) if step is not None else None,
                source=SOURCE,
            )
        else:
            raise _FormError(f"Unknown action '{action}'.")
    except UnknownTask:
        return _page(request, "missing.html", 404, what=f"No task '{task}'.")
    except (GatewayError, UnknownAdapter, _FormError) as exc:
        message = exc.message if isinstance(exc, GatewayError) else f"{str(exc)[:1].upper()}{str(exc)[1:]}"
        status = exc.status if isinstance(exc, GatewayError) else 400
        return await _task_page(request, db, promoter, policy_store, task, status, error=message)
    return Redirect(f"/console/tasks/{quote(task, safe='')}?done={action}", status_code=303, headers=HEADERS)


class _FormError(ValueError):
    """A form field the console cannot use; shown on the page it came from."""


@get("/tasks/{task:str}/pairs/{pair_id:int}")
async def pair_view(request: Request[Any, Any, Any], db: Database, task: str, pair_id: int) -> Response[str]:
    pair = await asyncio.to_thread(shadow_pair, db, task, pair_id)
    if pair is None:
        return _page(request, "missing.html", 404, what=f"Task '{task}' has no pair {pair_id}.")
    teacher, student = answer_text(pair.teacher_response), answer_text(pair.student_response)
    found = await asyncio.to_thread(record, db, pair.record_id)
    return _page(
        request,
        "pair.html",
        task=task,
        pair=pair,
        rows=side_by_side(teacher, student),
        json_answers=is_json(teacher) or is_json(student),
        request_body=found.request if found is not None else None,
    )


# -- the policy ----------------------------------------------------------------------------------
async def _policy_page(
    request: Request[Any, Any, Any],
    policy_store: PolicyStore | None,
    task: str,
    text: str | None = None,
    error: str | None = None,
    status: int = 200,
) -> Response[str]:
    editable = True
    if text is None:
        try:
            text = await asyncio.to_thread(task_section, policy_store, task)
        except NoPolicyFile as exc:
            editable, text, error = False, "", str(exc)
        except (OSError, ValueError) as exc:
            text, error = "", f"cannot read the policy file: {exc}"
    resolved = None
    if policy_store is not None:
        summary = policy_summary(policy_store.policy)
        resolved = next((row for row in summary.tasks if row.task == task), summary.tasks[0])
    return _page(
        request,
        "policy.html",
        status,
        task=task,
        text=text,
        error=error,
        editable=editable,
        file=str(policy_store.path) if policy_store is not None and policy_store.path else None,
        version=policy_store.version if policy_store is not None else 0,
        resolved=resolved,
    )


@get("/tasks/{task:str}/policy")
async def policy_form(
    request: Request[Any, Any, Any], policy_store: PolicyStore | None, task: str
) -> Response[str]:
    return await _policy_page(request, policy_store, task)


@post("/tasks/{task:str}/policy")
async def edit_policy(
    request: Request[Any, Any, Any], policy_store: PolicyStore | None, task: str
) -> Response[str] | Redirect:
    """Validate the edited section as ``distillgate policy check`` would; write and reload only if valid."""
    form = await request.form()
    text = str(form.get("section") or "").replace("\r\n", "\n")
    try:
        await asyncio.to_thread(apply_task_section, policy_store, task, text)
    except PolicyError as exc:
        return await _policy_page(request, policy_store, task, text, str(exc), 422)
    return Redirect(f"/console/tasks/{quote(task, safe='')}?done=policy", status_code=303, headers=HEADERS)


# -- records -------------------------------------------------------------------------------------
def _when(value: str | None) -> datetime | None:
    """A ``datetime-local`` field (no zone: UTC, as records are stored) or an ISO time."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


@get("/records")
async def records_page(request: Request[Any, Any, Any], db: Database) -> Response[str]:
    q = {k: str(v).strip() for k, v in request.query_params.items() if str(v).strip()}
    error = None
    page = int(q["page"]) if q.get("page", "").isdigit() else 1
    try:
        status = q.get("status")
        if status is not None and not status.isdigit():
            raise ValueError(f"status must be an HTTP status code, not {status!r}")
        search = RecordSearch(
            task=q.get("task"),
            target=q.get("target"),
            status=int(status) if status else None,
            since=_when(q.get("since")),
            until=_when(q.get("until")),
        )
    except ValueError as exc:
        error, search = str(exc), None
    rows = []
    if search is not None:
        rows = await asyncio.to_thread(
            search_records, db, search, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE + 1
        )
    more = len(rows) > PAGE_SIZE
    keep = {k: v for k, v in q.items() if k != "page"}
    return _page(
        request,
        "records.html",
        400 if error else 200,
        rows=rows[:PAGE_SIZE],
        q=q,
        error=error,
        page=page,
        prev_url=f"?{urlencode({**keep, 'page': page - 1})}" if page > 1 else None,
        next_url=f"?{urlencode({**keep, 'page': page + 1})}" if more else None,
    )


@get("/records/{record_id:str}")
async def record_page(request: Request[Any, Any, Any], db: Database, record_id: str) -> Response[str]:
    found = await asyncio.to_thread(record, db, record_id)
    if found is None:
        return _page(request, "missing.html", 404, what=f"No record with id '{record_id}'.")
    return _page(request, "record.html", rec=found)


def _promoter(state: State) -> Promoter:
    """The gate (not among ``gateway.app.PARTS``: only the console reads it from a handler)."""
    promoter: Promoter = state.parts.promoter
    return promoter


ROUTES = [
    login_form,
    login,
    logout,
    static,
    home,
    tasks_page,
    task_view,
    act,
    pair_view,
    policy_form,
    edit_policy,
    records_page,
    record_page,
]


def console_router(admin_key: str | None) -> Router:
    """The console at ``/console``; its sessions are signed with a secret derived from ``admin_key``."""
    sessions = Sessions(admin_key)
    return Router(
        "/console",
        route_handlers=ROUTES,
        before_request=gatekeeper(sessions),
        dependencies={"promoter": Provide(_promoter, sync_to_thread=False)},
        include_in_schema=False,
    )
