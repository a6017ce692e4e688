"""The event channel between a test run inside an environment and the run that reports it.

Transport-agnostic: a byte stream (a pipe after a fork, a process's stdout, a
socket) carries frames of a 4-byte length and a JSON object ``{"event": NAME,
...}``.  Encoding never fails: a value JSON cannot carry (an enum in
``record_property``, a ``Path``, an object with a custom ``__repr__``) is carried
as its ``repr`` and listed under ``"lossy"``, so that the receiving side can say so.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from collections.abc import Mapping
from typing import Any

_HEADER = struct.Struct(">I")
#: the largest frame accepted (a report with a long traceback and captured output)
MAX_FRAME = 256 * 1024 * 1024


class ChannelClosed(EOFError):
    """The other side is gone (or sent a damaged frame)."""


def portable(value: object, lossy: list[str], where: str = "") -> object:
    """``value`` as JSON can carry it; what it cannot is replaced by its ``repr`` and its
    place appended to ``lossy``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {
            (key if isinstance(key, str) else repr(key)): portable(item, lossy, f"{where}.{key}")
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [portable(item, lossy, f"{where}[{index}]") for index, item in enumerate(value)]
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the report
        text = f"<{type(value).__qualname__} object, repr() failed: {exc!r}>"
    lossy.append(f"{where.lstrip('.')}: {type(value).__qualname__}")
    return text


class Channel:
    """One end of the channel: ``send`` on a write descriptor, ``receive`` on a read one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def send(self, event: str, **payload: object) -> None:
        """Send one event; values JSON cannot carry travel as their repr (see ``lossy``)."""
        lossy: list[str] = []
        body = portable(payload, lossy)
        assert isinstance(body, dict)
        body["event"] = event
        if lossy:
            body["lossy"] = lossy
        data = json.dumps(body).encode()
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self.fd, view) :]

    def receive(self, deadline: float | None = None) -> dict[str, Any] | None:
        """The next event, or ``None`` once ``deadline`` (a ``time.monotonic()`` value)
        has passed; raises :class:`ChannelClosed` at the end of the stream."""
        while True:
            frame = self._frame()
            if frame is not None:
                return frame
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], wait)
            if not ready:
                return None
            block = os.read(self.fd, 1 << 16)
            if not block:
                raise ChannelClosed("the other side ended")
            self._buffer += block

    def _frame(self) -> dict[str, Any] | None:
        if len(self._buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buffer)
        if size > MAX_FRAME:
            raise ChannelClosed(f"a frame of {size} bytes: not this channel's")
        if len(self._buffer) < _HEADER.size + size:
            return None
        data = self._buffer[_HEADER.size : _HEADER.size + size]
        self._buffer = self._buffer[_HEADER.size + size :]
        try:
            frame = json.loads(data)
        except ValueError as exc:
            raise ChannelClosed(f"a damaged frame: {exc}") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("event"), str):
            raise ChannelClosed("a frame without an event")
        return frame
