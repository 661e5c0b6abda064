package posthorn_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/dynamicpb"

	posthorn "github.com/posthorn/posthorn/writers/go"
)

func jsonEvent(t testing.TB, aggregateType string, payload any) posthorn.Event {
	t.Helper()
	ev, err := posthorn.NewEvent(aggregateType, "order-42", "OrderShipped").JSON(payload).Build()
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

func TestACommittedEventIsPublished(t *testing.T) {
	s := env(t)
	topic := unique("go_commit")
	var id uuid.UUID
	s.inTx(t, func(tx pgx.Tx) (err error) {
		id, err = posthorn.Enqueue(context.Background(), tx, jsonEvent(t, topic, map[string]string{"carrier": "DHL"}))
		return err
	})
	r := s.records(t, topic, 1)[0]
	if got, _ := header(r, "event-id"); got != id.String() {
		t.Errorf("event-id %q, want %s", got, id)
	}
	if string(r.Key) != "order-42" || string(r.Value) != `{"carrier": "DHL"}` {
		t.Errorf("key %q value %q", r.Key, r.Value)
	}
}

func TestACommittedEventIsPublishedWithDatabaseSQL(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	topic := unique("go_sql_commit")
	db := stdlib.OpenDBFromPool(s.pool)
	defer db.Close()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := posthorn.Enqueue(ctx, tx, jsonEvent(t, topic, []int{1, 2}))
	if err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	r := s.records(t, topic, 1)[0]
	if got, _ := header(r, "event-id"); got != id.String() || string(r.Value) != "[1, 2]" {
		t.Errorf("event-id %q value %q, want %s [1, 2]", got, r.Value, id)
	}
}

func TestARolledBackEventIsNeverPublished(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	topic := unique("go_rollback")
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := posthorn.Enqueue(ctx, tx, jsonEvent(t, topic, "rolled back")); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	// A later committed event on the same topic: once it is there, the rolled-back one, which
	// would have come first, is known never to come.
	s.inTx(t, func(tx pgx.Tx) error {
		_, err := posthorn.Enqueue(ctx, tx, jsonEvent(t, topic, "committed"))
		return err
	})
	s.waitDelivered(t, topic, 1)
	if r := s.records(t, topic, 1)[0]; string(r.Value) != `"committed"` {
		t.Errorf("first record %q, want the committed event", r.Value)
	}
}

func TestABatchOf1000IsOneStatementAndArrivesInInputOrder(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	// Counts inserting statements per aggregate type: a statement-level trigger sees all the
	// rows one statement inserted.
	_, err := s.pool.Exec(ctx, `
		CREATE TABLE IF NOT EXISTS insert_statements (aggregate_type text, n_rows bigint);
		CREATE OR REPLACE FUNCTION count_insert_statement() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			INSERT INTO insert_statements SELECT aggregate_type, count(*) FROM new_rows GROUP BY 1;
			RETURN NULL;
		END $$;
		CREATE OR REPLACE TRIGGER count_insert_statement AFTER INSERT ON outbox
			REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_insert_statement();`)
	if err != nil {
		t.Fatal(err)
	}
	topic := unique("go_batch")
	events := make([]posthorn.Event, 1000)
	for i := range events {
		// Five aggregates interleaved: input order holds within each and across the partition.
		ev, err := posthorn.NewEvent(topic, fmt.Sprintf("order-%d", i%5), "OrderShipped").
			JSON(map[string]int{"seq": i}).Build()
		if err != nil {
			t.Fatal(err)
		}
		events[i] = ev
	}
	var ids []uuid.UUID
	s.inTx(t, func(tx pgx.Tx) (err error) {
		ids, err = posthorn.EnqueueBatch(ctx, tx, events)
		return err
	})
	var statements, rows int64
	if err := s.pool.QueryRow(ctx, `SELECT count(*), coalesce(sum(n_rows), 0) FROM insert_statements
		WHERE aggregate_type = $1`, topic).Scan(&statements, &rows); err != nil {
		t.Fatal(err)
	}
	if statements != 1 || rows != 1000 {
		t.Fatalf("%d statements inserted %d rows, want 1 statement of 1000", statements, rows)
	}
	records := s.records(t, topic, 1000)
	for i, r := range records {
		var payload struct{ Seq int }
		if err := json.Unmarshal(r.Value, &payload); err != nil {
			t.Fatal(err)
		}
		if got, _ := header(r, "event-id"); payload.Seq != i || got != ids[i].String() {
			t.Fatalf("record %d is seq %d, event-id %s; want seq %d, %s", i, payload.Seq, got, i, ids[i])
		}
	}
}

func TestBytesArriveByteExact(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	topic := unique("go_bytes")
	s.createTopic(t, topic)
	large := make([]byte, 1<<20)
	_, _ = rand.Read(large)
	values := [][]byte{{0xff, 0xfe, 0x00, 0xc3, 0x28, 0x80}, {}, large}
	var events []posthorn.Event
	for _, v := range values {
		ev, err := posthorn.NewEvent(topic, "order-42", "LabelPrinted").
			Bytes(v, "application/octet-stream").Build()
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, ev)
	}
	s.inTx(t, func(tx pgx.Tx) error {
		_, err := posthorn.EnqueueBatch(ctx, tx, events)
		return err
	})
	for i, r := range s.records(t, topic, len(values)) {
		if r.Value == nil || !bytes.Equal(r.Value, values[i]) {
			t.Errorf("record %d: %d bytes (nil: %v), want %d exactly", i, len(r.Value), r.Value == nil, len(values[i]))
		}
		if ct, _ := header(r, "content-type"); ct != "application/octet-stream" {
			t.Errorf("record %d: content-type %q", i, ct)
		}
	}
}

// spanContext is ctx with a span of the SDK's tracer, child of a remote parent that has a
// tracestate.
func spanContext(t *testing.T) (context.Context, trace.Span) {
	t.Helper()
	parent, err := trace.ParseTraceState("posthorn=t61rcWkgMzE")
	if err != nil {
		t.Fatal(err)
	}
	traceID, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	spanID, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	ctx := trace.ContextWithRemoteSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: traceID, SpanID: spanID, TraceFlags: trace.FlagsSampled, TraceState: parent, Remote: true,
	}))
	provider := sdktrace.NewTracerProvider()
	t.Cleanup(func() { _ = provider.Shutdown(context.Background()) })
	return provider.Tracer("posthorn-writer-test").Start(ctx, "ship order")
}

// traceparentOf is what W3C trace-context says traceparent is for ctx's span.
func traceparentOf(ctx context.Context) string {
	carrier := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, carrier)
	return carrier["traceparent"]
}

func TestTheTraceContextOfTheSpanInCtxReachesTheKafkaHeaders(t *testing.T) {
	s := env(t)
	ctx, span := spanContext(t)
	defer span.End()
	topic := unique("go_trace")
	s.inTx(t, func(tx pgx.Tx) error {
		_, err := posthorn.Enqueue(ctx, tx, jsonEvent(t, topic, 1))
		return err
	})
	r := s.records(t, topic, 1)[0]
	want := traceparentOf(ctx)
	if !strings.HasPrefix(want, "00-4bf92f3577b34da6a3ce929d0e0e4736-") || strings.Contains(want, "00f067aa0ba902b7") {
		t.Fatalf("not a child span's traceparent: %s", want)
	}
	if got, _ := header(r, "traceparent"); got != want {
		t.Errorf("traceparent %q, want %q", got, want)
	}
	if got, _ := header(r, "tracestate"); got != "posthorn=t61rcWkgMzE" {
		t.Errorf("tracestate %q", got)
	}
}

// headersWritten enqueues ev with ctx in a rolled-back transaction and returns the row's headers.
func headersWritten(t *testing.T, ctx context.Context, ev posthorn.Event) map[string]string {
	t.Helper()
	s := env(t)
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	id, err := posthorn.Enqueue(ctx, tx, ev)
	if err != nil {
		t.Fatal(err)
	}
	var headers map[string]string
	if err := tx.QueryRow(ctx, "SELECT headers FROM outbox WHERE event_id = $1", id).Scan(&headers); err != nil {
		t.Fatal(err)
	}
	return headers
}

func TestAnExplicitTraceparentWinsOverTheSpanInCtx(t *testing.T) {
	ctx, span := spanContext(t)
	defer span.End()
	explicit := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	ev, err := posthorn.NewEvent("order", "order-42", "OrderShipped").Tombstone().
		Header("traceparent", explicit).Build()
	if err != nil {
		t.Fatal(err)
	}
	headers := headersWritten(t, ctx, ev)
	if len(headers) != 1 || headers["traceparent"] != explicit {
		t.Errorf("headers %v: want only the explicit traceparent (no tracestate of another trace)", headers)
	}
}

func TestWithoutASpanInCtxNoTraceHeadersAreWritten(t *testing.T) {
	ev, err := posthorn.NewEvent("order", "order-42", "OrderShipped").Tombstone().Build()
	if err != nil {
		t.Fatal(err)
	}
	if headers := headersWritten(t, context.Background(), ev); headers != nil {
		t.Errorf("headers %v, want NULL", headers)
	}
}

func TestEventsAreWrittenToTheConfiguredSchemaAndTable(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	s.migrateTable(t, "sales", "order_events")
	outbox, err := posthorn.NewOutbox("sales", "order_events")
	if err != nil {
		t.Fatal(err)
	}
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	id, err := outbox.Enqueue(ctx, tx, jsonEvent(t, "order", 1))
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM sales.order_events WHERE event_id = $1", id).Scan(&n); err != nil || n != 1 {
		t.Fatalf("%d rows in sales.order_events (%v)", n, err)
	}
}

func TestOutboxNamesMustBeLowercaseIdentifiers(t *testing.T) {
	for _, names := range [][2]string{{"Sales", "outbox"}, {"public", `out"box`}, {"public", "1x"}, {"", "t"}} {
		if _, err := posthorn.NewOutbox(names[0], names[1]); !errors.Is(err, posthorn.ErrInvalidName) {
			t.Errorf("%q.%q: %v", names[0], names[1], err)
		}
	}
}

func TestAMissingTableIsReportedAsNotMigrated(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	outbox, err := posthorn.NewOutbox("public", "no_such_outbox")
	if err != nil {
		t.Fatal(err)
	}
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	_, err = outbox.Enqueue(ctx, tx, jsonEvent(t, "order", 1))
	var pgErr *pgconn.PgError
	if !errors.Is(err, posthorn.ErrNotMigrated) || !errors.Is(err, posthorn.ErrDatabase) || !errors.As(err, &pgErr) || pgErr.Code != "42P01" {
		t.Fatalf("%v", err)
	}
	if !strings.Contains(err.Error(), "run `posthorn migrate`") {
		t.Errorf("no hint: %v", err)
	}
}

func TestAnEventWithoutAPayloadSaysWhatToCall(t *testing.T) {
	_, err := posthorn.NewEvent("order", "order-42", "OrderShipped").Build()
	var invalid *posthorn.InvalidEventError
	if !errors.As(err, &invalid) || invalid.Field != "payload" || !strings.Contains(err.Error(), ".JSON(..), .Bytes(..) or .Tombstone()") {
		t.Fatalf("%v", err)
	}
}

func TestTextThatIsNotUTF8IsRefused(t *testing.T) {
	_, err := posthorn.NewEvent("order", "order-\xff", "OrderShipped").Tombstone().Build()
	if !errors.Is(err, posthorn.ErrInvalidEvent) || err.Error() != "invalid event: aggregate_id is not valid UTF-8, which Postgres text requires" {
		t.Fatalf("%v", err)
	}
}

func TestAPayloadThatCannotBeJSONIsAnInvalidEventWrappingTheCause(t *testing.T) {
	_, err := posthorn.NewEvent("order", "order-42", "OrderShipped").JSON(make(chan int)).Build()
	var cause *json.UnsupportedTypeError
	if !errors.Is(err, posthorn.ErrInvalidEvent) || !errors.As(err, &cause) {
		t.Fatalf("%v", err)
	}
}

func TestSomethingThatIsNoTransactionIsRefused(t *testing.T) {
	_, err := posthorn.Enqueue(context.Background(), "not a tx", jsonEvent(t, "order", 1))
	if !errors.Is(err, posthorn.ErrUnsupportedTx) {
		t.Fatalf("%v", err)
	}
}

func TestTheOrderShippedExampleIsPublished(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	orderID := unique("order")
	_, err := s.pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, status text NOT NULL,
		carrier text, version int NOT NULL DEFAULT 0)`)
	if err == nil {
		_, err = s.pool.Exec(ctx, "INSERT INTO orders (id, status) VALUES ($1, 'placed')", orderID)
	}
	if err != nil {
		t.Fatal(err)
	}
	id, err := HandleShipRequest(ctx, s.pool, orderID, "DHL")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := HandleShipRequest(ctx, s.pool, orderID, "DHL"); err == nil {
		t.Error("an order shipped twice")
	}
	r := s.recordWithEventID(t, "order", id.String())
	want := fmt.Sprintf(`{"carrier": "DHL", "order_id": "%s"}`, orderID)
	if string(r.Key) != orderID || string(r.Value) != want {
		t.Errorf("key %q value %s, want %s", r.Key, r.Value, want)
	}
}

func TestTheProtobufExampleWritesTheVectorsBytesAndIsPublished(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	ev, err := OrderShippedEvent("order-42", "DHL", 2)
	if err != nil {
		t.Fatal(err)
	}
	// The bytes of the vector "protobuf bytes of OrderShipped{...}", as prost writes them.
	if fmt.Sprintf("%x", ev.Bytes()) != "0a086f726465722d3432120344484c1802" {
		t.Fatalf("encoded %x", ev.Bytes())
	}
	var id uuid.UUID
	s.inTx(t, func(tx pgx.Tx) (err error) {
		id, err = posthorn.Enqueue(ctx, tx, ev)
		return err
	})
	r := s.recordWithEventID(t, "order", id.String())
	decoded := dynamicpb.NewMessage(orderShippedType)
	if err := proto.Unmarshal(r.Value, decoded); err != nil {
		t.Fatal(err)
	}
	carrier := decoded.Get(orderShippedType.Fields().ByName("carrier")).String()
	if ct, _ := header(r, "content-type"); ct != ProtobufContentType || carrier != "DHL" {
		t.Errorf("content-type %q, carrier %q", ct, carrier)
	}
}

func TestTheDocsQuoteEveryGoExampleVerbatim(t *testing.T) {
	docs, err := os.ReadFile(filepath.Join("..", "..", "docs", "writing-events.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, file := range []string{"example_order_shipped_test.go", "example_protobuf_test.go"} {
		example, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(docs, bytes.TrimRight(example, "\n")) {
			t.Errorf("docs/writing-events.md does not quote writers/go/%s as it is", file)
		}
	}
}
