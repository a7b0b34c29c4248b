"""gunicorn settings for the lbpool example: gevent workers, one PoolManager per worker.

Run from this folder: ``gunicorn -c gunicorn.conf.py app:app`` (the lbpool config is
``$LBPOOL_CONFIG``, default ``config.yaml`` here).

Why these hooks: gunicorn calls ``post_fork`` in the new worker *before* the gevent
worker monkey patches and starts its hub; ``post_worker_init`` runs after, in the
worker's own hub, so a manager built there runs its upkeep greenlets in the hub that
serves the requests. ``worker_exit`` runs in the worker as it exits (after a graceful
SIGTERM drained the requests): the manager closes its connections there, so the servers
see every connection closed rather than reset by the process's death.

Why ``import app`` inside the hooks: this file is executed by the master too. Imported
here at module level, ``app`` (and lbpool) would be loaded in the master, and every
worker would fork with the master's copy already in ``sys.modules``: ``kill -HUP``
and ``max_requests`` restarts would then never load changed application code. Inside
the hooks, the import runs in the worker, which loads ``app:app`` itself first.
"""

import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = 2
worker_class = "gevent"
worker_connections = 1000
graceful_timeout = 10


def post_worker_init(worker):
    import app  # in the worker, never in the master (see above)

    app.open_manager()
    worker.log.info("lbpool manager ready (pid %s, config %s)", os.getpid(), app.CONFIG)


def worker_exit(server, worker):
    import app

    app.close_manager()
    server.log.info("lbpool manager closed (pid %s)", os.getpid())
