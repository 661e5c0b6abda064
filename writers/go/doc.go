// Package posthorn writes transactional-outbox events for the posthorn relay inside the
// caller's own Postgres transaction, with pgx (v5) or database/sql.
//
// An event is one row in the outbox table; posthorn publishes each committed row to Kafka (key:
// the aggregate id; value: the payload; headers: the event's own plus event-id, event-type,
// aggregate-type, outbox-id and content-type). Because the row is written in the caller's
// transaction, the event exists exactly when the change commits: a rolled-back transaction's
// events are never published.
//
//   - [NewEvent] starts an event; [EventBuilder.Build] checks it against the outbox table's
//     rules, so that writing it sends nothing Postgres would refuse (an error there would abort
//     the caller's transaction).
//   - [Enqueue] writes one event, [EnqueueBatch] any number in one statement, on the transaction
//     passed in (a pgx.Tx or a *sql.Tx). They never begin, commit or roll back.
//   - [NewOutbox] names another table than public.outbox (the relay's POSTHORN_SCHEMA and
//     POSTHORN_TABLE).
//   - The W3C trace context (traceparent, tracestate) of the OpenTelemetry span in the ctx
//     passed to Enqueue is written into the event's headers, so a consumer continues the trace.
//
// This is the Go twin of the Rust crate posthorn-writer: both write the same row for every
// event and refuse the same events with the same messages, which the shared test vectors in
// writers/vectors check.
//
// The table needs posthorn's migration 5 (posthorn migrate), which adds the payload_bytes and
// content_type columns.
package posthorn
