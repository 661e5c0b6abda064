//! A small service that writes outbox rows the way a real one would: each event is one
//! transaction that locks the order, changes it, and inserts the outbox row. Some transactions
//! roll back on purpose; their rows must never reach Kafka.
//!
//! POSTHORN_DATABASE_URL=... cargo run --example sample_writer -- --orders 20 --events-per-order 5

use std::time::Instant;

use clap::Parser;
use sqlx::postgres::PgPoolOptions;

#[derive(Parser)]
struct Args {
    /// Number of orders (aggregates, Kafka keys).
    #[arg(long, default_value_t = 20)]
    orders: usize,
    /// Events written per order.
    #[arg(long, default_value_t = 5)]
    events_per_order: usize,
    /// Concurrent writer tasks.
    #[arg(long, default_value_t = 4)]
    writers: usize,
}

const STATUSES: [&str; 5] = ["placed", "paid", "packed", "shipped", "delivered"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let url = std::env::var("POSTHORN_DATABASE_URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(args.writers as u32)
        .connect(&url)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, status text NOT NULL, version int NOT NULL)",
    )
    .execute(&pool)
    .await?;

    let started = Instant::now();
    let n_events = args.orders * args.events_per_order;
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let pool = pool.clone();
        let orders = args.orders;
        tasks.push(tokio::spawn(async move {
            let (mut committed, mut rolled_back) = (0usize, 0usize);
            // Writer w takes events w, w + writers, ...: several writers touch each order, and
            // the order's row lock puts its events in commit order.
            for j in (w..n_events).step_by(args.writers) {
                let order_id = format!("order-{}", j % orders);
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO orders VALUES ($1, 'new', 0) ON CONFLICT DO NOTHING")
                    .bind(&order_id)
                    .execute(&mut *tx)
                    .await?;
                let version: i32 =
                    sqlx::query_scalar("SELECT version FROM orders WHERE id = $1 FOR UPDATE")
                        .bind(&order_id)
                        .fetch_one(&mut *tx)
                        .await?;
                let version = version + 1;
                let status = STATUSES[(version as usize - 1) % STATUSES.len()];
                sqlx::query("UPDATE orders SET status = $2, version = $3 WHERE id = $1")
                    .bind(&order_id)
                    .bind(status)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
                     VALUES ('order', $1, $2, jsonb_build_object('order_id', $1::text, 'status', $3::text, 'version', $4::int), \
                             '{\"source\": \"sample-writer\"}')",
                )
                .bind(&order_id)
                .bind(format!("Order{}{}", &status[..1].to_uppercase(), &status[1..]))
                .bind(status)
                .bind(version)
                .execute(&mut *tx)
                .await?;
                if j % 10 == 9 {
                    // A business rule fails after the row was written: nothing is published.
                    tx.rollback().await?;
                    rolled_back += 1;
                } else {
                    tx.commit().await?;
                    committed += 1;
                }
            }
            Ok::<_, sqlx::Error>((committed, rolled_back))
        }));
    }
    let (mut committed, mut rolled_back) = (0, 0);
    for t in tasks {
        let (c, r) = t.await??;
        committed += c;
        rolled_back += r;
    }
    println!(
        "sample writer: {committed} events committed, {rolled_back} rolled back, over {} orders in {:.2?}",
        args.orders,
        started.elapsed()
    );
    // The last line is the count, for scripts.
    println!("{committed}");
    Ok(())
}
