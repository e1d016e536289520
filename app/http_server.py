"""The HTTP server of `vkmmu serve`: uvicorn with a header size limit in its parser.

The app's `InputLimitMiddleware` answers 431 too, but only once the server has parsed and
buffered every header: a 128 MB header would be read and held first. Here the limit is
kept while the bytes arrive: the request line and headers together may be at most
`max_header_bytes` (counted as the app counts them: target, names and values, plus 4 bytes
per header); past it the connection gets a 431 problem and is closed, and the parser never
buffers more than one network read beyond the limit.
"""

from __future__ import annotations

import gc
import json
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.errors import PROBLEM_BASE, PROBLEM_JSON

log = logging.getLogger(__name__)

# The collector's thresholds while serving (CPython's defaults: 700, 10, 10). A VM with
# 32,763 memslots is a large heap of long-lived objects, and every full collection walks all
# of it (0.1-0.3 s): with the defaults, creating those slots ran eight of them, a third of
# its time. Young collections keep their pace (a request's garbage is mostly freed by
# reference counting anyway); a full one runs at most every ~7M allocations, not 70k.
GC_THRESHOLDS = (700, 10, 1000)


def tune_gc() -> None:
    """Once the server is up: move what startup built (the app, its routes, schemas and
    modules, never garbage) out of the collector's sight, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# Request line (method, version) and whitespace the app's count of a head leaves out.
_UNCOUNTED_SLACK = 1024


class _HeadTooLarge(Exception):
    pass


class HeaderLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head past `max_header_bytes`."""

    max_header_bytes = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = False  # between a request's first byte and its last header
        self._head_counted = 0  # target, names and values seen (the app's count)
        self._head_raw = 0  # bytes received while the head was open (memory bound)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open, self._head_counted, self._head_raw = True, 0, 0

    def _count(self, n: int) -> None:
        self._head_counted += n
        if self._head_counted > self.max_header_bytes:
            raise _HeadTooLarge

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, with a head past the limit answered 431 instead of 400.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._head_counted > self.max_header_bytes:
                self._send_431()  # a callback refused it (raised _HeadTooLarge)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._head_open:
            # Still in the head: everything read since it began is head. The parser holds
            # a partial header itself until it completes; refuse before it holds more than
            # the limit (plus the request line and separators the app's count leaves out).
            self._head_raw += len(data)
            if self._head_raw > self.max_header_bytes + _UNCOUNTED_SLACK:
                self._send_431()

    def _send_431(self) -> None:
        if self.transport.is_closing():
            return
        detail = f"the request line and headers exceed {self.max_header_bytes} bytes"
        body = json.dumps(
            {
                "type": PROBLEM_BASE + "http-431",
                "title": "Request Header Fields Too Large",
                "status": 431,
                "detail": detail,
            }
        ).encode()
        log.warning("request refused: %s", detail)
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            + f"content-type: {PROBLEM_JSON}\r\n".encode()
            + f"content-length: {len(body)}\r\n".encode()
            + b"connection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()


def header_limited(max_header_bytes: int) -> type[HeaderLimitedProtocol]:
    """The protocol class for `uvicorn.Config(http=…)` with this limit."""
    return type(
        "HeaderLimitedProtocol",
        (HeaderLimitedProtocol,),
        {"max_header_bytes": max_header_bytes},
    )


__all__ = ["HeaderLimitedProtocol", "header_limited", "httptools"]
