//! The `opentelemetry` feature: an event carries the W3C trace context it was written in.

use std::collections::{BTreeMap, HashMap};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Adds `traceparent` (and `tracestate`, when not empty) of `cx`, or else of the current
/// context, to `headers`: only when that context has a valid span and the caller set no
/// `traceparent` of its own.
///
/// Always the W3C propagator, whatever the global one is: the relay copies headers to Kafka
/// unchanged, and consumers look for exactly these two.
pub(crate) fn inject(cx: Option<&Context>, headers: &mut BTreeMap<String, String>) {
    if headers.contains_key("traceparent") {
        return;
    }
    let mut carrier = HashMap::new();
    match cx {
        Some(cx) => TraceContextPropagator::new().inject_context(cx, &mut carrier),
        None => TraceContextPropagator::new().inject_context(&Context::current(), &mut carrier),
    }
    for (name, value) in carrier {
        if !value.is_empty() {
            headers.entry(name).or_insert(value);
        }
    }
}
