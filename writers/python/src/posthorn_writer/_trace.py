"""The W3C trace context of the current OpenTelemetry span, when opentelemetry-api is there."""

from __future__ import annotations

try:
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - the optional dependency is absent
    _otel_trace = None  # type: ignore[assignment]


def trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``, when not empty) of the current span; empty when there
    is no valid span. Always the W3C propagator, whatever the global one is: the relay copies
    headers to Kafka unchanged, and consumers look for exactly these two."""
    if _otel_trace is None or not _otel_trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return {name: value for name, value in carrier.items() if value}
