"""Where the pipeline meets BentoML: the one patch of BentoML, checked at start-up.

BentoML 1.4 builds each worker's ASGI app in `ServiceAppFactory.__call__`: its own middlewares
(traffic metrics by raw path, OpenTelemetry, the access log, its timeout and concurrency
limits, the service context) outside, then the service's own (`add_asgi_middleware`, the public
hook), then the routes. A public middleware therefore always runs inside BentoML's: it cannot
check a key, refuse a full worker or bound a body before BentoML's layers have seen the request,
nor keep a client's paths out of BentoML's metrics. `install()` wraps that one method so that,
for TextService only, the app uvicorn runs is the pipeline (pipeline.py) around BentoML's app;
BentoML's app still runs the lifespan (it builds the service instance and runs its
on_startup/on_shutdown hooks) and answers the probes and /metrics.

`check()`, called from TextService's first start-up hook, refuses to start a worker whose app
is not the pipeline (a BentoML upgrade that no longer builds apps there): without it every
protection of the pipeline would be silently gone. tests/test_attacks.py runs it against the
pinned version.
"""

from __future__ import annotations

from collections.abc import Callable

BUILT: list[object] = []  # the pipelines this process built (one per worker process)


def install(service_definition, build_pipeline: Callable[[object], object]) -> None:
    """Make BentoML's app factory return `build_pipeline(bentoml_app)` for `service_definition`
    (the decorated TextService); other services (the runner) keep BentoML's app. Idempotent."""
    from _bentoml_impl.server.app import ServiceAppFactory

    if getattr(ServiceAppFactory.__call__, "_textserve", False):
        return
    build = ServiceAppFactory.__call__

    def build_with_pipeline(factory):
        app = build(factory)
        if factory.service is not service_definition:
            return app
        pipeline = build_pipeline(app)
        BUILT.append(pipeline)
        return pipeline

    build_with_pipeline._textserve = True
    ServiceAppFactory.__call__ = build_with_pipeline


def check() -> None:
    """Raise RuntimeError unless this process built its app as the pipeline."""
    if not BUILT:
        raise RuntimeError("BentoML did not build this worker's app through ServiceAppFactory.__call__, so the request "
                           "pipeline (keys, limits, admission, metrics) is not in place; the pinned bentoml is 1.4.39")


def traced(app, settings):
    """`app` inside OpenTelemetry's ASGI middleware (what BentoML itself uses), with the tracer
    BentoML's configuration sets up, when TEXTSERVE_TRACING=1; else `app` itself (a span per
    request cost a fifth of a small request's CPU in a profile)."""
    if not settings.tracing:
        return app
    from bentoml._internal.configuration.containers import BentoMLContainer
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, tracer_provider=BentoMLContainer.tracer_provider.get())
