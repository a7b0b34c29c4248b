"""Checks of the arguments that the compiled classes' public methods take.

mypyc checks an argument annotated with a builtin type (``int``, ``bool``, ``str``,
``float``, a ``NamedTuple``, or a union of them) before the method's body runs. Its
``TypeError`` names neither the argument nor the method, and its wording is mypyc's
(it changes with mypyc's version), while the pure-Python sources would take the same
value without a word. So the public methods of ``Pool`` and ``PooledConnection``
annotate such parameters with protocols, which mypyc does not check and a type checker
still does (``Text`` for a str, ``Flag`` for a flag, ``typing.SupportsIndex``,
``typing.SupportsFloat``), and check them here, with lbpool's own message, the same in
both builds (``tests/library/test_arguments.py`` holds both to it).

Every function here raises ``TypeError`` (a value of the wrong type) or ``ValueError``
(the right type, out of range); ``where`` starts the message (a pool's name). Never
yields.
"""

from __future__ import annotations

from operator import index
from typing import Any, Protocol


class Text(Protocol):
    """A ``str`` argument, to a type checker (``str`` is the one builtin type with
    ``casefold``: ``bytes``, numbers and None are refused), that the compiled build
    leaves to lbpool's own check."""

    def casefold(self) -> str: ...


class Flag(Protocol):
    """A flag argument, to a type checker (``bool``, ``int``: what has ``__bool__``);
    at run time any value, taken by its truth."""

    def __bool__(self) -> bool: ...


def got(value: object) -> str:
    """``int 3``, ``str '2'``: the type and a short repr, for a message (the repr only
    of plain values, cut short; an int too long to print is named by its type;
    ``None`` as itself)."""
    if value is None:
        return "None"
    text = ""
    if isinstance(value, (bool, int, float, str, bytes)):
        try:
            text = repr(value)
        except Exception:  # an int past the digit limit; a subclass's own repr
            text = ""
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}".rstrip()


def check_type(value: object, kind: type | tuple[type, ...], what: str, where: str) -> None:
    """``TypeError`` unless ``value`` is a ``kind`` (a class or a tuple of them) or
    None; ``what`` names the argument and what it must be (``"pool must be a
    PoolConfig"``)."""
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{where}: {what} or None, got {got(value)}")


def valid_int(value: object, what: str, where: str) -> int:
    """``value`` as an ``int`` (an ``int`` or any ``__index__`` object, as
    ``operator.index``; not a ``bool``): ``TypeError`` naming ``what`` otherwise (also
    when its ``__index__`` raises, as ``truth`` does)."""
    if not isinstance(value, bool):
        try:
            return index(value)  # type: ignore[arg-type]
        except Exception as exc:
            raise TypeError(f"{where}: {what}, got {got(value)}") from exc
    raise TypeError(f"{where}: {what}, got {got(value)}")


def valid_weight(value: object, where: str) -> int:
    """``value`` as a server's weight: an integer of at least 1 (as the config's
    ``weight``; ``True`` is not a number of shares here either)."""
    weight = valid_int(value, "weight must be an int >= 1", where)
    if weight < 1:
        raise ValueError(f"{where}: weight must be an int >= 1, got {got(weight)}")
    return weight


def truth(value: object, what: str, where: str) -> bool:
    """``bool(value)``, or ``TypeError`` naming ``what`` if asking raises (an array, a
    query expression): asked once, before anything changes."""
    try:
        return bool(value)
    except Exception as exc:
        raise TypeError(f"{where}: {what} must be true or false, got {got(value)}") from exc


def valid_callable(value: object, what: str, where: str, *, optional: bool = True) -> Any:
    """``value`` if it is callable (or None, when ``optional``), else ``TypeError``
    naming ``what``."""
    if optional and value is None:
        return value
    if not callable(value):
        must = "a callable or None" if optional else "a callable"
        raise TypeError(f"{where}: {what} must be {must}, got {got(value)}")
    return value
