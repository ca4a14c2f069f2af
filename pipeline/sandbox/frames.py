"""Part of the sandbox worker program (see :mod:`pipeline.sandbox.worker`): the length-prefixed JSON
frames the host and the worker talk in, shared with the host side. Standard library only."""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

_HEADER = struct.Struct(">I")


def encode_frame(payload: dict[str, Any]) -> bytes:
    """One length-prefixed JSON frame (JSON, not pickle: the host never unpickles)."""
    data = json.dumps(payload).encode()
    return _HEADER.pack(len(data)) + data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_frame(fd: int, deadline: float | None = None) -> dict[str, Any]:
    """Read one frame; EOFError when the peer is gone, TimeoutError past ``deadline``."""
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return json.loads(_read_exact(fd, size, deadline))


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    poller = None
    while size:
        if deadline is not None:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError("no answer from the sandbox worker before the deadline")
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the sandbox worker closed its pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
