"""The raw file under ``PooledConnection.makefile``.

A module of its own, never compiled: mypyc cannot make a native subclass of
``io.RawIOBase`` that Python 3.12+ accepts (the type's dict flags clash), and a file
object is not on the hot path. Imports nothing from lbpool at run time.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lbpool.connection import PooledConnection

__all__ = ["_BorrowIO"]


class _BorrowIO(io.RawIOBase):
    """The raw file under ``PooledConnection.makefile``: reads and writes go through
    the handle, so the file ends with the borrow (``closed`` once the handle is
    released, discarded or its pool force-closed it). As ``socket.SocketIO``, a
    socket without a timeout left (non-blocking, or timed out) reads as None."""

    def __init__(self, handle: PooledConnection, mode: str) -> None:
        super().__init__()
        self._handle = handle
        self._reading = "r" in mode
        self._writing = "w" in mode

    @property
    def closed(self) -> bool:
        return self._handle._conn is None or super().closed

    def readable(self) -> bool:
        self._checkClosed()
        return self._reading

    def writable(self) -> bool:
        self._checkClosed()
        return self._writing

    def readinto(self, b: Any) -> int | None:
        self._checkClosed()
        try:
            return self._handle.recv_into(b)
        except BlockingIOError:
            return None

    def write(self, b: Any) -> int | None:
        self._checkClosed()
        try:
            return self._handle.send(b)
        except BlockingIOError:
            return None

    def fileno(self) -> int:
        self._checkClosed()
        return self._handle.sock.fileno()
