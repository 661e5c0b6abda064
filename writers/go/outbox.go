package posthorn

import (
	"context"
	"database/sql"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Tx is the transaction events are written in: a pgx.Tx (or *pgx.Conn, *pgxpool.Conn,
// *pgxpool.Tx: anything with pgx v5's Query method) or a *sql.Tx (or *sql.Conn: anything with
// database/sql's QueryContext). The two have no method in common, so Tx is checked when used;
// anything else gets ErrUnsupportedTx.
type Tx any

type pgxQuerier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

type sqlQuerier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// Outbox is the table events are written to: the relay's POSTHORN_SCHEMA.POSTHORN_TABLE.
type Outbox struct {
	schema, table string
	// pgxSQL binds arrays natively; textSQL takes each array as text, which any database/sql
	// driver can send.
	pgxSQL, textSQL string
}

var defaultOutbox = mustOutbox("public", "outbox")

// DefaultOutbox returns public.outbox, the relay's default.
func DefaultOutbox() *Outbox { return defaultOutbox }

// NewOutbox names the table schema.table; both must be lowercase SQL identifiers (a-z, 0-9, _,
// not starting with a digit, at most 63 bytes), as the relay requires. Otherwise the error
// matches ErrInvalidName.
func NewOutbox(schema, table string) (*Outbox, error) {
	for _, n := range []struct{ what, name string }{{"schema", schema}, {"table", table}} {
		if !isIdentifier(n.name) {
			return nil, fmt.Errorf("%w: %s '%s' is not a lowercase SQL identifier (a-z, 0-9, _; at most 63 bytes; not starting with a digit)", ErrInvalidName, n.what, n.name)
		}
	}
	qualified := fmt.Sprintf(`"%s"."%s"`, schema, table)
	return &Outbox{
		schema:  schema,
		table:   table,
		pgxSQL:  insertSQL(qualified, ""),
		textSQL: insertSQL(qualified, "::text"),
	}, nil
}

func mustOutbox(schema, table string) *Outbox {
	o, err := NewOutbox(schema, table)
	if err != nil {
		panic(err)
	}
	return o
}

// Schema is the table's schema.
func (o *Outbox) Schema() string { return o.schema }

// Table is the table's name.
func (o *Outbox) Table() string { return o.table }

// Enqueue writes ev to public.outbox in tx; see [Outbox.Enqueue].
func Enqueue(ctx context.Context, tx Tx, ev Event) (uuid.UUID, error) {
	return defaultOutbox.Enqueue(ctx, tx, ev)
}

// EnqueueBatch writes events to public.outbox in one statement in tx; see
// [Outbox.EnqueueBatch].
func EnqueueBatch(ctx context.Context, tx Tx, events []Event) ([]uuid.UUID, error) {
	return defaultOutbox.EnqueueBatch(ctx, tx, events)
}

// Enqueue writes ev in tx and returns its event id (the record's event-id header). The event
// commits or rolls back with tx; Enqueue never begins, commits or rolls back anything itself.
func (o *Outbox) Enqueue(ctx context.Context, tx Tx, ev Event) (uuid.UUID, error) {
	ids, err := o.EnqueueBatch(ctx, tx, []Event{ev})
	if err != nil {
		return uuid.UUID{}, err
	}
	return ids[0], nil
}

// EnqueueBatch writes events in tx in one statement and returns their event ids in the order of
// events. Events of one aggregate are published in this order too. Nothing is sent for no
// events.
//
// Each event gets the W3C trace context (traceparent, tracestate) of the span in ctx, unless it
// has a traceparent header of its own.
func (o *Outbox) EnqueueBatch(ctx context.Context, tx Tx, events []Event) ([]uuid.UUID, error) {
	if len(events) == 0 {
		return nil, nil
	}
	for _, ev := range events {
		if ev.kind == 0 {
			return nil, invalid("payload", "an Event must be made by EventBuilder.Build")
		}
	}
	cols := columnsOf(events, traceHeaders(ctx))
	switch q := tx.(type) {
	case pgxQuerier:
		rows, err := q.Query(ctx, o.pgxSQL, cols.aggregateTypes, cols.aggregateIDs, cols.eventTypes,
			cols.payloads, cols.payloadBytes, cols.contentTypes, cols.topics, cols.headers)
		if err != nil {
			return nil, o.databaseError(err)
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil {
			return nil, o.databaseError(err)
		}
		return ids, nil
	case sqlQuerier:
		rows, err := q.QueryContext(ctx, o.textSQL, textArray(cols.aggregateTypes),
			textArray(cols.aggregateIDs), textArray(cols.eventTypes), nullableTextArray(cols.payloads),
			byteaArray(cols.payloadBytes), nullableTextArray(cols.contentTypes),
			nullableTextArray(cols.topics), nullableTextArray(cols.headers))
		if err != nil {
			return nil, o.databaseError(err)
		}
		defer rows.Close()
		ids := make([]uuid.UUID, 0, len(events))
		for rows.Next() {
			var id uuid.UUID
			if err := rows.Scan(&id); err != nil {
				return nil, o.databaseError(err)
			}
			ids = append(ids, id)
		}
		if err := rows.Err(); err != nil {
			return nil, o.databaseError(err)
		}
		return ids, nil
	default:
		return nil, fmt.Errorf("%w: %T (pass a pgx.Tx or a *sql.Tx)", ErrUnsupportedTx, tx)
	}
}

func (o *Outbox) databaseError(err error) error {
	return &DatabaseError{Table: o.schema + "." + o.table, Err: err}
}

// columns are the events side by side, one array per column; nil is NULL.
type columns struct {
	aggregateTypes, aggregateIDs, eventTypes []string
	payloads, contentTypes, topics, headers  []*string
	payloadBytes                             [][]byte
}

func columnsOf(events []Event, trace map[string]string) columns {
	n := len(events)
	c := columns{
		aggregateTypes: make([]string, n), aggregateIDs: make([]string, n), eventTypes: make([]string, n),
		payloads: make([]*string, n), contentTypes: make([]*string, n), topics: make([]*string, n),
		headers: make([]*string, n), payloadBytes: make([][]byte, n),
	}
	for i := range events {
		ev := &events[i]
		c.aggregateTypes[i], c.aggregateIDs[i], c.eventTypes[i] = ev.aggregateType, ev.aggregateID, ev.eventType
		switch ev.kind {
		case JSON:
			c.payloads[i] = &ev.json
		case Bytes:
			c.payloadBytes[i] = ev.bytes
			c.contentTypes[i] = &ev.contentType
		}
		if ev.topic != "" {
			c.topics[i] = &ev.topic
		}
		if headers := ev.headersWithTrace(trace); headers != "" {
			c.headers[i] = &headers
		}
	}
	return c
}

// insertSQL is one statement for any number of events: the arrays are unnested side by side,
// in order (the Rust writer's statement). Event ids are drawn in the materialized CTE and
// returned from it ordered by position, so they are in input order by construction (RETURNING's
// order is not specified); the INSERT reads the CTE by position too, so the rows' identity ids,
// the relay's publishing order within an aggregate, follow the input order. cast is "" when the
// driver binds arrays, "::text" when each array is sent as its text form.
func insertSQL(table, cast string) string {
	return strings.NewReplacer("{table}", table, "{t}", cast).Replace(
		`WITH event AS MATERIALIZED (
    SELECT gen_random_uuid() AS event_id, e.*
    FROM unnest($1{t}::text[], $2{t}::text[], $3{t}::text[], $4{t}::text[], $5{t}::bytea[],
                $6{t}::text[], $7{t}::text[], $8{t}::text[])
         WITH ORDINALITY AS e(aggregate_type, aggregate_id, event_type, payload,
                              payload_bytes, content_type, topic, headers, position)
), inserted AS (
    INSERT INTO {table} (event_id, aggregate_type, aggregate_id, event_type, payload,
                         payload_bytes, content_type, topic, headers)
    SELECT event_id, aggregate_type, aggregate_id, event_type, payload::jsonb,
           payload_bytes, content_type, topic, headers::jsonb
    FROM event ORDER BY position
)
SELECT event_id FROM event ORDER BY position`)
}

// textArray is values as a Postgres array literal, e.g. {"a","b\"c"}.
func textArray(values []string) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, v := range values {
		if i > 0 {
			b.WriteByte(',')
		}
		writeQuoted(&b, v)
	}
	b.WriteByte('}')
	return b.String()
}

func nullableTextArray(values []*string) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, v := range values {
		if i > 0 {
			b.WriteByte(',')
		}
		if v == nil {
			b.WriteString("NULL")
		} else {
			writeQuoted(&b, *v)
		}
	}
	b.WriteByte('}')
	return b.String()
}

// byteaArray is values as a bytea[] literal of hex elements ({"\\x0a08",NULL}).
func byteaArray(values [][]byte) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, v := range values {
		if i > 0 {
			b.WriteByte(',')
		}
		if v == nil {
			b.WriteString("NULL")
			continue
		}
		b.WriteString(`"\\x`)
		b.WriteString(hex.EncodeToString(v))
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

// writeQuoted writes v as a double-quoted array element: inside quotes only '"' and '\' are
// special.
func writeQuoted(b *strings.Builder, v string) {
	b.WriteByte('"')
	for i := 0; i < len(v); i++ {
		if v[i] == '"' || v[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(v[i])
	}
	b.WriteByte('"')
}

func isIdentifier(name string) bool {
	if name == "" || len(name) > 63 || ('0' <= name[0] && name[0] <= '9') {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z') && !('0' <= c && c <= '9') && c != '_' {
			return false
		}
	}
	return true
}
