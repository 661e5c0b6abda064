package posthorn

import (
	"context"
	"encoding/json"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// traceHeaders is traceparent (and tracestate, when not empty) of the span in ctx, or nil when
// ctx has no valid span. Always the W3C propagator, whatever the global one is: the relay copies
// headers to Kafka unchanged, and consumers look for exactly these two.
func traceHeaders(ctx context.Context) map[string]string {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return nil
	}
	carrier := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, carrier)
	for name, value := range carrier {
		if value == "" {
			delete(carrier, name)
		}
	}
	return carrier
}

// headersWithTrace is the headers column of e with trace added, unless e sets a traceparent of
// its own; "" for none.
func (e *Event) headersWithTrace(trace map[string]string) string {
	if len(trace) == 0 {
		return e.headersJSON
	}
	if _, explicit := e.headers["traceparent"]; explicit {
		return e.headersJSON
	}
	headers := make(map[string]string, len(e.headers)+len(trace))
	for name, value := range trace {
		headers[name] = value
	}
	for name, value := range e.headers {
		headers[name] = value // the event's own tracestate, if any, stays
	}
	text, _ := json.Marshal(headers) // a map of strings always encodes
	return string(text)
}
