"""``spotdiff serve``: an HTTP inspection service over calibrated model directories (docs/serve.md).

>>> from spotdiff.serve import ServeConfig, create_app, load_models   # doctest: +SKIP
>>> app = create_app(load_models(["models/padim"]), AuditLog("audit.jsonl"), ServeConfig())  # doctest: +SKIP

``scoring`` (models, and the service's steps around ``predict``'s per-image path), ``batching``
(micro-batches off the event loop), ``audit`` (fsync'ed JSON lines), ``metrics`` (Prometheus text),
``config`` (limits, API keys, the loopback rule), ``app`` (routes, errors), ``page`` (the operator's
page) and ``server`` (validation, then uvicorn).
"""

from spotdiff.serve.app import create_app
from spotdiff.serve.audit import AuditLog
from spotdiff.serve.config import ServeConfig, read_api_keys
from spotdiff.serve.server import load_models, serve

__all__ = ["AuditLog", "ServeConfig", "create_app", "load_models", "read_api_keys", "serve"]
