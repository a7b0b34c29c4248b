"""Checks of the arguments that the compiled classes' public methods take.

mypyc checks an argument annotated with a builtin type (``int``, ``bool``, ``str``,
``float``, a ``NamedTuple``, or a union of them) before the method's body runs. Its
``TypeError`` names neither the argument nor the method, and its wording is mypyc's
(it changes with mypyc's version), while the pure-Python sources would take the same
value without a word. So the public methods of ``Pool`` and ``PooledConnection``
annotate such parameters with types mypyc does not check (``object``, or a protocol
such as ``SupportsIndex``, ``SupportsFloat``, ``SupportsBool``), and check them here,
with lbpool's own message, the same in both builds (``tests/library/test_arguments.py``
holds both to it).

Every function here raises ``TypeError`` (a value of the wrong type) or ``ValueError``
(the right type, out of range); ``where`` starts the message (a pool's name). Never
yields.
"""

from __future__ import annotations

from typing import Any


def got(value: object) -> str:
    """``int 3``, ``str '2'``: the type and a short repr, for a message."""
    text = repr(value) if isinstance(value, (bool, int, float, str, bytes)) else ""
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}".rstrip()


def check_type(value: object, kind: type | tuple[type, ...], what: str, where: str) -> None:
    """``TypeError`` unless ``value`` is a ``kind`` (a class or a tuple of them) or
    None; ``what`` names the argument and what it must be (``"pool must be a
    PoolConfig"``)."""
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{where}: {what} or None, got {got(value)}")


def valid_weight(value: object, where: str) -> int:
    """``value`` as a server's weight: an ``int`` of at least 1 (as the config's
    ``weight``; ``True`` is not a number of shares here either)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: weight must be an int >= 1, got {got(value)}")
    if value < 1:
        raise ValueError(f"{where}: weight must be an int >= 1, got {value}")
    return int(value)


def valid_callable(value: object, what: str, where: str) -> Any:
    """``value`` if it is callable or None, else ``TypeError`` naming ``what``."""
    if value is not None and not callable(value):
        raise TypeError(f"{where}: {what} must be a callable or None, got {got(value)}")
    return value
