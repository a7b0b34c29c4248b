"""Deliver an exception into a waiting greenlet *now*, before callbacks already
scheduled on the hub run: the window in which a handed-off connection can be lost."""

from __future__ import annotations

import gevent


def throw_now(greenlet: gevent.Greenlet, exc: BaseException) -> None:
    """Raise ``exc`` inside ``greenlet`` synchronously, then come back here.

    ``greenlet.throw`` runs it at once; when it finishes, control passes to the hub,
    which runs the callbacks queued before ours (e.g. a pending handoff) and then
    switches back to us.
    """
    current = gevent.getcurrent()
    gevent.get_hub().loop.run_callback(current.switch)
    greenlet.throw(exc)
