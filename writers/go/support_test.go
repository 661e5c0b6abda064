package posthorn_test

// Test support: a database of this test run's own, migrated by the real posthorn binary, one
// `posthorn run` relaying it to the real Kafka, and a franz-go consumer to read what arrived.
// Every test writes to topics of its own, so tests do not see each other's records.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// The relay's largest record: the 1 MiB tests need more than librdkafka's default.
const maxMessageBytes = 2097152

type services struct {
	url     string // this run's database
	brokers string
	pool    *pgxpool.Pool
	relay   *exec.Cmd
	err     error
}

var (
	setUp  sync.Once
	shared services
)

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.relay != nil {
		_ = shared.relay.Process.Kill()
		_ = shared.relay.Wait()
	}
	if shared.pool != nil {
		shared.pool.Close()
	}
	os.Exit(code)
}

// env starts the services on first use: tests that need none run without them.
func env(t testing.TB) *services {
	t.Helper()
	setUp.Do(func() { shared.err = shared.start() })
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return &shared
}

func (s *services) start() error {
	adminURL, brokers := os.Getenv("POSTHORN_TEST_DATABASE_URL"), os.Getenv("POSTHORN_TEST_KAFKA_BROKERS")
	if adminURL == "" || brokers == "" {
		return fmt.Errorf("POSTHORN_TEST_DATABASE_URL and POSTHORN_TEST_KAFKA_BROKERS must be set: eval \"$(bash scripts/services.sh up)\"")
	}
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		return err
	}
	defer admin.Close(ctx)
	name := unique("posthorn_t_go")
	if _, err := admin.Exec(ctx, fmt.Sprintf(`CREATE DATABASE "%s"`, name)); err != nil {
		return err
	}
	s.url = adminURL[:strings.LastIndex(adminURL, "/")+1] + name
	s.brokers = brokers
	relayEnv := append(environWithout("POSTHORN_"),
		"POSTHORN_DATABASE_URL="+s.url,
		"POSTHORN_KAFKA_BROKERS="+brokers,
		"POSTHORN_TOPIC_TEMPLATE={aggregate_type}",
		"POSTHORN_POLL_INTERVAL_MS=100",
		"POSTHORN_HTTP_ADDR=127.0.0.1:0",
		fmt.Sprintf("POSTHORN_KAFKA_MESSAGE_MAX_BYTES=%d", maxMessageBytes),
		"POSTHORN_LOG=warn",
	)
	migrate := exec.Command(posthornBin(), "migrate")
	migrate.Env = relayEnv
	if out, err := migrate.CombinedOutput(); err != nil {
		return fmt.Errorf("posthorn migrate: %v\n%s", err, out)
	}
	s.relay = exec.Command(posthornBin(), "run")
	s.relay.Env = relayEnv
	s.relay.Stderr = os.Stderr
	if err := s.relay.Start(); err != nil {
		return fmt.Errorf("posthorn run: %w", err)
	}
	s.pool, err = pgxpool.New(ctx, s.url)
	return err
}

// environWithout is this process's environment minus the variables starting with prefix (the
// relay warns about POSTHORN_* variables it does not know, such as the tests' own).
func environWithout(prefix string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, prefix) {
			out = append(out, kv)
		}
	}
	return out
}

func posthornBin() string {
	if bin := os.Getenv("POSTHORN_BIN"); bin != "" {
		return bin
	}
	return filepath.Join("..", "..", "target", "debug", "posthorn")
}

// unique is prefix_<random hex>: a database or topic name no other run uses.
func unique(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + "_" + hex.EncodeToString(b)
}

// inTx runs f in a transaction of the pool and commits it.
func (s *services) inTx(t testing.TB, f func(pgx.Tx) error) {
	t.Helper()
	if err := pgx.BeginFunc(context.Background(), s.pool, f); err != nil {
		t.Fatal(err)
	}
}

// waitDelivered waits until the relay marked every row of aggregateType delivered and there
// are n of them.
func (s *services) waitDelivered(t testing.TB, aggregateType string, n int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		var delivered, pending int
		err := s.pool.QueryRow(context.Background(),
			`SELECT count(*) FILTER (WHERE delivered_at IS NOT NULL), count(*) FILTER (WHERE delivered_at IS NULL)
			 FROM outbox WHERE aggregate_type = $1`, aggregateType).Scan(&delivered, &pending)
		if err != nil {
			t.Fatal(err)
		}
		if delivered >= n && pending == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d rows of %s delivered within 60 s (%d pending)", delivered, n, aggregateType, pending)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// records reads topic from its start until it has n records, failing after 60 s.
func (s *services) records(t testing.TB, topic string, n int) []*kgo.Record {
	t.Helper()
	client, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(s.brokers, ",")...),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchMaxBytes(4*maxMessageBytes),
		kgo.FetchMaxPartitionBytes(2*maxMessageBytes),
		kgo.MetadataMinAge(100*time.Millisecond),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var records []*kgo.Record
	for len(records) < n {
		fetches := client.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("%d of %d records on %s within 60 s", len(records), n, topic)
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			t.Logf("fetching %s/%d: %v", topic, partition, err)
		})
		records = append(records, fetches.Records()...)
	}
	return records
}

// createTopic creates a one-partition topic whose records may be up to maxMessageBytes.
func (s *services) createTopic(t testing.TB, topic string) {
	t.Helper()
	client, err := kgo.NewClient(kgo.SeedBrokers(strings.Split(s.brokers, ",")...))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	req := kmsg.NewPtrCreateTopicsRequest()
	rt := kmsg.NewCreateTopicsRequestTopic()
	rt.Topic, rt.NumPartitions, rt.ReplicationFactor = topic, 1, 1
	maxBytes := fmt.Sprint(maxMessageBytes)
	rt.Configs = []kmsg.CreateTopicsRequestTopicConfig{{Name: "max.message.bytes", Value: &maxBytes}}
	req.Topics = append(req.Topics, rt)
	req.TimeoutMillis = 10000
	resp, err := req.RequestWith(context.Background(), client)
	if err != nil {
		t.Fatal(err)
	}
	if code := resp.Topics[0].ErrorCode; code != 0 {
		t.Fatalf("creating topic %s: error code %d", topic, code)
	}
}

// header is the value of the record's first header called name, and whether there is one.
func header(r *kgo.Record, name string) (string, bool) {
	for _, h := range r.Headers {
		if h.Key == name {
			return string(h.Value), true
		}
	}
	return "", false
}

// migrateTable creates schema.table with posthorn migrate, as the relay for it would.
func (s *services) migrateTable(t testing.TB, schema, table string) {
	t.Helper()
	migrate := exec.Command(posthornBin(), "migrate")
	migrate.Env = append(environWithout("POSTHORN_"),
		"POSTHORN_DATABASE_URL="+s.url, "POSTHORN_KAFKA_BROKERS="+s.brokers,
		"POSTHORN_SCHEMA="+schema, "POSTHORN_TABLE="+table, "POSTHORN_LOG=warn")
	if out, err := migrate.CombinedOutput(); err != nil {
		t.Fatalf("posthorn migrate: %v\n%s", err, out)
	}
}

// recordWithEventID reads topic from its start until the record with header event-id: id.
func (s *services) recordWithEventID(t testing.TB, topic, id string) *kgo.Record {
	t.Helper()
	client, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(s.brokers, ",")...),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.MetadataMinAge(100*time.Millisecond),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		fetches := client.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("no record with event-id %s on %s within 60 s", id, topic)
		}
		for _, r := range fetches.Records() {
			if got, _ := header(r, "event-id"); got == id {
				return r
			}
		}
	}
}
