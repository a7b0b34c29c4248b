"""lbpool under the clients people already use.

Each module here imports its client library (an optional extra) and is never imported
by ``import lbpool``:

- ``lbpool.contrib.redis`` (extra ``redis``): a redis-py ``ConnectionPool`` whose
  connections are borrowed from an lbpool backend, and the ``handshake`` setup hook.
- ``lbpool.contrib.pymemcache`` (extra ``memcache``): a ``HashClient``-like memcached
  client whose keys are routed by an lbpool key-affinity backend and whose protocol is
  pymemcache's.
"""
