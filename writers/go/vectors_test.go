package posthorn_test

// The shared test vectors (writers/vectors): this writer writes exactly the row each event case
// lists, or refuses it with exactly the error, as the Rust writer and the SQL functions do; and
// the relay publishes exactly the records of records.json.

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	posthorn "github.com/posthorn/posthorn/writers/go"
)

type eventInput struct {
	AggregateType string          `json:"aggregate_type"`
	AggregateID   string          `json:"aggregate_id"`
	EventType     string          `json:"event_type"`
	Payload       json.RawMessage `json:"payload"`
	Topic         *string         `json:"topic"`
	Headers       [][2]string     `json:"headers"`
}

type row struct {
	AggregateType   string  `json:"aggregate_type"`
	AggregateID     string  `json:"aggregate_id"`
	EventType       string  `json:"event_type"`
	Payload         *string `json:"payload"`
	PayloadBytesHex *string `json:"payload_bytes_hex"`
	ContentType     *string `json:"content_type"`
	Topic           *string `json:"topic"`
	Headers         *string `json:"headers"`
}

type eventCase struct {
	Name  string     `json:"name"`
	Event eventInput `json:"event"`
	Row   *row       `json:"row"`
	Error *struct {
		Field   string `json:"field"`
		Message string `json:"message"`
	} `json:"error"`
}

type record struct {
	Key      string      `json:"key"`
	ValueHex *string     `json:"value_hex"`
	Headers  [][2]string `json:"headers"`
}

type recordCase struct {
	Name   string     `json:"name"`
	Event  eventInput `json:"event"`
	Record record     `json:"record"`
}

// rowQuery is how every writer's tests read rows back, so that they compare the same text.
const rowQuery = `SELECT aggregate_type, aggregate_id, event_type, payload::text, encode(payload_bytes, 'hex'),
	content_type, topic, headers::text FROM outbox ORDER BY id`

func readVectors[C any](t *testing.T, file string) []C {
	t.Helper()
	text, err := os.ReadFile(filepath.Join("..", "vectors", file))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct{ Cases []C }
	if err := json.Unmarshal(text, &doc); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return doc.Cases
}

// build makes the case's event with the builder. JSON numbers are decoded as json.Number, so
// that 9007199254740993 stays itself.
func build(t *testing.T, in eventInput) (posthorn.Event, error) {
	t.Helper()
	b := posthorn.NewEvent(in.AggregateType, in.AggregateID, in.EventType)
	var payload map[string]json.RawMessage
	switch {
	case string(in.Payload) == `"tombstone"`:
		b.Tombstone()
	case json.Unmarshal(in.Payload, &payload) != nil:
		t.Fatalf("payload %s", in.Payload)
	case payload["json"] != nil:
		var value any
		dec := json.NewDecoder(bytes.NewReader(payload["json"]))
		dec.UseNumber()
		if err := dec.Decode(&value); err != nil {
			t.Fatal(err)
		}
		b.JSON(value)
	case payload["bytes"] != nil:
		var bytesPayload struct {
			Hex         string `json:"hex"`
			ContentType string `json:"content_type"`
		}
		if err := json.Unmarshal(payload["bytes"], &bytesPayload); err != nil {
			t.Fatal(err)
		}
		data, err := hex.DecodeString(bytesPayload.Hex)
		if err != nil {
			t.Fatal(err)
		}
		b.Bytes(data, bytesPayload.ContentType)
	default:
		t.Fatalf("payload %s", in.Payload)
	}
	if in.Topic != nil {
		b.Topic(*in.Topic)
	}
	for _, h := range in.Headers {
		b.Header(h[0], h[1])
	}
	return b.Build()
}

func TestEveryEventBuildsOrIsRefusedAsItsVectorSays(t *testing.T) {
	cases := readVectors[eventCase](t, "events.json")
	if len(cases) < 50 {
		t.Fatalf("only %d cases", len(cases))
	}
	for _, c := range cases {
		_, err := build(t, c.Event)
		if c.Error == nil {
			if err != nil {
				t.Errorf("%s: %v", c.Name, err)
			}
			continue
		}
		var invalid *posthorn.InvalidEventError
		if !errors.As(err, &invalid) || !errors.Is(err, posthorn.ErrInvalidEvent) {
			t.Errorf("%s: want an InvalidEventError, got %v", c.Name, err)
			continue
		}
		if invalid.Field != c.Error.Field || invalid.Message != c.Error.Message {
			t.Errorf("%s:\n got %s: %s\nwant %s: %s", c.Name, invalid.Field, invalid.Message, c.Error.Field, c.Error.Message)
		}
		if err.Error() != "invalid event: "+c.Error.Message {
			t.Errorf("%s: %q", c.Name, err)
		}
	}
}

func validEvents(t *testing.T, cases []eventCase) ([]posthorn.Event, []row) {
	var events []posthorn.Event
	var rows []row
	for _, c := range cases {
		if c.Row == nil {
			continue
		}
		ev, err := build(t, c.Event)
		if err != nil {
			t.Fatalf("%s: %v", c.Name, err)
		}
		events = append(events, ev)
		rows = append(rows, *c.Row)
	}
	return events, rows
}

func readRows(t *testing.T, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}) []row {
	t.Helper()
	rows, err := q.Query(context.Background(), rowQuery)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var out row
		err := r.Scan(&out.AggregateType, &out.AggregateID, &out.EventType, &out.Payload,
			&out.PayloadBytesHex, &out.ContentType, &out.Topic, &out.Headers)
		return out, err
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func TestEnqueueWithPgxWritesExactlyEachVectorsRow(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	events, want := validEvents(t, readVectors[eventCase](t, "events.json"))
	for i, ev := range events {
		tx, err := s.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// Rolled back: the relay never sees these rows.
		if _, err := posthorn.Enqueue(ctx, tx, ev); err != nil {
			t.Fatal(err)
		}
		got := readRows(t, tx)
		_ = tx.Rollback(ctx)
		if len(got) != 1 || !reflect.DeepEqual(got[0], want[i]) {
			t.Errorf("row %d:\n got %s\nwant %s", i, show(got), show(want[i]))
		}
	}
}

func TestEnqueueBatchWithPgxWritesTheVectorsRowsInInputOrder(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	events, want := validEvents(t, readVectors[eventCase](t, "events.json"))
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	ids, err := posthorn.EnqueueBatch(ctx, tx, events)
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != len(events) {
		t.Fatalf("%d ids for %d events", len(ids), len(events))
	}
	if got := readRows(t, tx); !reflect.DeepEqual(got, want) {
		t.Errorf("rows:\n got %s\nwant %s", show(got), show(want))
	}
}

func TestEnqueueBatchWithDatabaseSQLWritesTheVectorsRowsInInputOrder(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	events, want := validEvents(t, readVectors[eventCase](t, "events.json"))
	db := stdlib.OpenDBFromPool(s.pool)
	defer db.Close()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback() }()
	ids, err := posthorn.EnqueueBatch(ctx, tx, events)
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != len(events) {
		t.Fatalf("%d ids for %d events", len(ids), len(events))
	}
	if got := readSQLRows(t, tx); !reflect.DeepEqual(got, want) {
		t.Errorf("rows:\n got %s\nwant %s", show(got), show(want))
	}
}

func readSQLRows(t *testing.T, tx *sql.Tx) []row {
	t.Helper()
	rows, err := tx.Query(rowQuery)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var got []row
	for rows.Next() {
		var out row
		if err := rows.Scan(&out.AggregateType, &out.AggregateID, &out.EventType, &out.Payload,
			&out.PayloadBytesHex, &out.ContentType, &out.Topic, &out.Headers); err != nil {
			t.Fatal(err)
		}
		got = append(got, out)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return got
}

func TestTheRelayPublishesExactlyTheVectorsRecords(t *testing.T) {
	s := env(t)
	ctx := context.Background()
	cases := readVectors[recordCase](t, "records.json")
	topic := unique("go-vectors")
	var events []posthorn.Event
	for _, c := range cases {
		// The topic is the test's own; it is not part of the record vectors.
		c.Event.Topic = &topic
		ev, err := build(t, c.Event)
		if err != nil {
			t.Fatalf("%s: %v", c.Name, err)
		}
		events = append(events, ev)
	}
	var ids []string
	s.inTx(t, func(tx pgx.Tx) error {
		eventIDs, err := posthorn.EnqueueBatch(ctx, tx, events)
		for _, id := range eventIDs {
			ids = append(ids, id.String())
		}
		return err
	})
	records := s.records(t, topic, len(cases))
	for i, c := range cases {
		var outboxID int64
		if err := s.pool.QueryRow(ctx, "SELECT id FROM outbox WHERE event_id = $1", ids[i]).Scan(&outboxID); err != nil {
			t.Fatal(err)
		}
		r := records[i]
		got := record{Key: string(r.Key), Headers: [][2]string{}}
		if r.Value != nil {
			v := hex.EncodeToString(r.Value)
			got.ValueHex = &v
		}
		for _, h := range r.Headers {
			value := string(h.Value)
			switch {
			case h.Key == "event-id" && value == ids[i]:
				value = "{event_id}"
			case h.Key == "outbox-id" && value == strconv.FormatInt(outboxID, 10):
				value = "{outbox_id}"
			}
			got.Headers = append(got.Headers, [2]string{h.Key, value})
		}
		if !reflect.DeepEqual(got, c.Record) {
			t.Errorf("%s:\n got %s\nwant %s", c.Name, show(got), show(c.Record))
		}
	}
}

func show(v any) string {
	text, _ := json.Marshal(v)
	return string(text)
}
