"""Pure ASGI middlewares: request id + access log + last-resort 500, and the body size limit.

Pure ASGI (not BaseHTTPMiddleware) so that request bodies stream through untouched and the
limit is enforced on the bytes actually received, chunked bodies included.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import input_limits
from app.api.errors import PROBLEM_BASE, PROBLEM_JSON
from app.api.log import request_id_var

log = logging.getLogger("vkmmu.access")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


async def _send_problem(
    send: Send, status: int, title: str, detail: str, kind: str, scope: Scope, rid: str | None
) -> None:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + kind,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": scope.get("path", ""),
    }
    if rid:
        body["request_id"] = rid
    raw = json.dumps(body).encode()
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(raw)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


class RequestContextMiddleware:
    """Gives every request an id (X-Request-ID, echoed), logs one line per request, and turns
    any exception that escaped the handlers into a logged 500 problem."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                cand = v.decode("latin-1")
                if _SAFE_REQUEST_ID.fullmatch(cand):
                    rid = cand
                break
        rid = rid or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        started = False
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error", extra={"path": scope.get("path")})
            if not started:
                await _send_problem(
                    send_wrapper,
                    500,
                    "Internal Server Error",
                    "the service failed unexpectedly; the request id identifies the log entry",
                    "internal",
                    scope,
                    rid,
                )
        finally:
            log.info(
                "request",
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - t0) * 1000, 3),
                },
            )
            request_id_var.reset(token)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the limit is passed; an HTTPException so that FastAPI's body
    reader re-raises it unchanged and the problem handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def _too_large(self, send: Send, scope: Scope, rid: str | None) -> None:
        detail = f"request body exceeds {self.limit} bytes"
        await _send_problem(send, 413, "Content Too Large", detail, "http-413", scope, rid)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope.get("state", {}).get("request_id")
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    # Refuse before reading a byte of it.
                    await self._too_large(send, scope, rid)
                    return
                break

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, send_wrapper)
        except BodyTooLarge:
            # Reached only when the app read the body outside FastAPI's body parser.
            if started:
                raise
            await self._too_large(send, scope, rid)


# Bodies up to this size have their JSON bounds checked on the event loop (microseconds);
# larger ones in a worker thread, so a big body never blocks other requests.
INLINE_CHECK_BYTES = 16 * 1024

# Methods whose bodies are parsed as JSON (GET/HEAD bodies are never read).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class InputLimitMiddleware:
    """Header size (431) and JSON shape bounds (422) checked before anything parses the
    request; see `app.api.input_limits`. Sits inside `BodyLimitMiddleware`, so the body it
    buffers is already bounded in bytes."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_header_bytes: int = input_limits.DEFAULT_MAX_HEADER_BYTES,
        max_json_items: int = input_limits.DEFAULT_MAX_JSON_ITEMS,
        max_json_depth: int = input_limits.DEFAULT_MAX_JSON_DEPTH,
    ) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_json_items = max_json_items
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope.get("state", {}).get("request_id")
        if input_limits.header_bytes(scope) > self.max_header_bytes:
            detail = f"the request line and headers exceed {self.max_header_bytes} bytes"
            await _send_problem(
                send, 431, "Request Header Fields Too Large", detail, "http-431", scope, rid
            )
            return
        if scope.get("method") not in _BODY_METHODS or not _json_or_unlabelled(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        if body:
            check = functools.partial(
                input_limits.check_json_body,
                body,
                max_items=self.max_json_items,
                max_depth=self.max_json_depth,
            )
            try:
                # A small body is checked on the loop: the thread hop would cost more than
                # the check (a memslot PUT's body is ~100 bytes).
                if len(body) <= INLINE_CHECK_BYTES:
                    check()
                else:
                    await asyncio.to_thread(check)
            except input_limits.InputRejected as e:
                await _send_validation_problem(send, scope, rid, e.msg, e.kind)
                return
        replayed: Message = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay([replayed], receive), send)


def _json_or_unlabelled(scope: Scope) -> bool:
    for k, v in scope.get("headers", ()):
        if k == b"content-type":
            media = v.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True  # FastAPI reads an unlabelled body as JSON


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _send_validation_problem(
    send: Send, scope: Scope, rid: str | None, msg: str, kind: str
) -> None:
    """The same 422 shape as a validation error, for a body refused before validation."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + "validation",
        "title": "Request is not the right shape",
        "status": 422,
        "detail": msg,
        "instance": scope.get("path", ""),
        "errors": [{"loc": ["body"], "msg": msg, "type": kind}],
    }
    if rid:
        body["request_id"] = rid
    raw = json.dumps(body).encode()
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(raw)).encode()),
    ]
    await send({"type": "http.response.start", "status": 422, "headers": headers})
    await send({"type": "http.response.body", "body": raw})
