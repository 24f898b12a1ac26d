"""`attrib serve`: attribution as an HTTP service (FastAPI on uvicorn) with a web page.

* :func:`create_app` builds the FastAPI app for one opened :class:`engine.Index` (tests drive it with
  FastAPI's TestClient);
* :func:`serve` runs it under uvicorn (``attrib serve``), in one process or several;
* :class:`ServeSettings` holds the limits (upload size, pixels, k, queue, batching, timeouts) and the security
  options (bearer token, CORS origins).

The index is used by one worker thread only (:mod:`engine.serve.worker`), which batches the queries that arrive
together; see README.md, "attrib serve".
"""
from __future__ import annotations

from .app import create_app
from .run import serve
from .settings import ServeSettings
from .worker import Busy, QueryWorker

__all__ = ["create_app", "serve", "ServeSettings", "QueryWorker", "Busy"]
