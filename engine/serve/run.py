"""Running the service under uvicorn: one process (the models load before the port opens), or ``workers``
processes that each load their own models and index (uvicorn's supervisor; the app comes from
:func:`app_from_env`, configured through one environment variable)."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
from dataclasses import asdict
from typing import Any

from .._errors import AttribError
from .._settings import QuerySettings
from ..ui import stderr_console
from .settings import ServeSettings

CONFIG_ENV = "ATTRIB_SERVE_CONFIG"  # JSON handed to worker processes (token included; the environment is private)


def _open(config: dict) -> Any:
    from .._index import Index

    index = Index(config["index"], models=config.get("models"), device=config.get("device"),
                  clip_weights=config.get("clip_weights"), dino_weights=config.get("dino_weights"),
                  settings=QuerySettings(**config.get("query_settings", {})))
    index.reader.warm()  # fast-scan lists packed before the first request, not during it
    return index


def app_from_env():
    """The app of one uvicorn worker process (``--workers N``): opens the index and loads the models itself."""
    from .app import create_app

    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise AttribError(f"{CONFIG_ENV} is not set: start the service with `attrib serve`")
    config = json.loads(raw)
    return create_app(_open(config), ServeSettings.from_dict(config["serve"]))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(index: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          settings: ServeSettings | None = None, models: str | None = None, device: str | None = None,
          clip_weights: str | None = None, dino_weights: str | None = None,
          query_settings: QuerySettings | None = None, log_level: str = "info", access_log: bool = True) -> int:
    """Serve an index until SIGTERM or Ctrl-C; in-flight requests finish first. Returns the exit code (0).

    Raises:
        IndexFormatError, ModelMismatchError, WeightsUnavailableError, FusionWeightsError: at start-up.
        AttribError: the port cannot be opened.
    """
    import uvicorn

    settings = settings or ServeSettings()
    config = {"index": os.fspath(index), "models": models, "device": device, "clip_weights": clip_weights,
              "dino_weights": dino_weights, "query_settings": asdict(query_settings or QuerySettings()),
              "serve": settings.to_env()}
    console = stderr_console()
    probe = _open(config)  # refuse a bad index (or a --models mismatch) before anything else
    counts = probe.manifest["counts"]
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if not _is_loopback(host) and settings.token is None:
        console.print(f"[bold yellow]warning:[/bold yellow] listening on {host} without a token: anyone who can "
                      "reach this machine can query the index (set ATTRIB_TOKEN or --token)")
    if probe.untrained:
        console.print(f"[bold yellow]UNTRAINED WEIGHTS[/bold yellow]: the index uses untrained "
                      f"'{probe.manifest['models']['profile']}' encoders; its answers are not real attributions")
    common = dict(host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on",
                  timeout_graceful_shutdown=int(settings.timeout_s + settings.read_timeout_s + 5),
                  server_header=False, h11_max_incomplete_event_size=64 * 1024)
    stopped: list[int] = []
    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        # uvicorn restores these after its graceful shutdown and re-raises the signal it caught: a stop asked for
        # is the normal end, exit 0
        try:
            handlers[sig] = signal.signal(sig, lambda s, f: stopped.append(s))
        except ValueError:  # not the main thread
            pass
    try:
        if workers > 1:
            probe.close()
            os.environ[CONFIG_ENV] = json.dumps(config)
            console.print(f"serving {counts['records']} records with {workers} worker processes (each loads its "
                          f"own models and index) at [bold]{where}[/bold]")
            uvicorn.run("engine.serve.run:app_from_env", factory=True, workers=workers, **common)
            return 0
        from .app import create_app

        try:
            app = create_app(probe, settings)  # the models load here, before the port opens
            console.print(f"serving {counts['records']} records at [bold]{where}[/bold] (docs: {where}docs; "
                          f"token {'required' if settings.token else 'off'})")
            server = uvicorn.Server(uvicorn.Config(app, **common))
            try:
                server.run()
            except SystemExit:  # uvicorn exits this way when it cannot bind; said below in one line
                pass
            if not server.started:
                raise AttribError(f"could not serve on {host}:{port} (see the message above: is the port in use, "
                                  "or the address not on this machine?); pick another --port or --host")
        finally:
            probe.close()
        return 0
    finally:
        os.environ.pop(CONFIG_ENV, None)
        for sig, old in handlers.items():
            signal.signal(sig, old)
