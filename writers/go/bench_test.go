package posthorn_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	posthorn "github.com/posthorn/posthorn/writers/go"
)

// The Rust writer's measurement (docs/writing-events.md): transactions of 1,000 small JSON
// events with a traceparent header, building the events, EnqueueBatch and commit, over TCP.
// The table is one no relay reads, so that publishing does not compete for the CPU.
//
//	go test -run '^$' -bench EnqueueBatch -benchtime 9x -count 3

func batchOf1000(b *testing.B) []posthorn.Event {
	events := make([]posthorn.Event, 1000)
	for i := range events {
		ev, err := posthorn.NewEvent("order", fmt.Sprintf("order-%d", i%50), "OrderShipped").
			JSON(map[string]any{"order_id": i, "carrier": "DHL"}).
			Header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").
			Build()
		if err != nil {
			b.Fatal(err)
		}
		events[i] = ev
	}
	return events
}

func BenchmarkEnqueueBatch1000WithPgx(b *testing.B) {
	s := env(b)
	s.migrateTable(b, "public", "bench_outbox")
	outbox, _ := posthorn.NewOutbox("public", "bench_outbox")
	ctx := context.Background()
	write := func(events []posthorn.Event) error {
		return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			_, err := outbox.EnqueueBatch(ctx, tx, events)
			return err
		})
	}
	if err := write(batchOf1000(b)); err != nil { // a warm-up: statement preparation, caches
		b.Fatal(err)
	}
	for b.Loop() {
		if err := write(batchOf1000(b)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*1000)/b.Elapsed().Seconds(), "events/s")
}

func BenchmarkEnqueueBatch1000WithDatabaseSQL(b *testing.B) {
	s := env(b)
	s.migrateTable(b, "public", "bench_outbox")
	outbox, _ := posthorn.NewOutbox("public", "bench_outbox")
	db := stdlib.OpenDBFromPool(s.pool)
	defer db.Close()
	ctx := context.Background()
	write := func(events []posthorn.Event) error {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer func() { _ = tx.Rollback() }()
		if _, err := outbox.EnqueueBatch(ctx, tx, events); err != nil {
			return err
		}
		return tx.Commit()
	}
	if err := write(batchOf1000(b)); err != nil { // a warm-up: statement preparation, caches
		b.Fatal(err)
	}
	for b.Loop() {
		if err := write(batchOf1000(b)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*1000)/b.Elapsed().Seconds(), "events/s")
}
