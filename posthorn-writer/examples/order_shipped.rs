// A small service: ship an order and write its `OrderShipped` event in the same transaction.
//
//     DATABASE_URL=postgres://... cargo run -p posthorn-writer --example order_shipped
//
// The outbox table must exist (`posthorn migrate`); the example makes its own `orders` table.

use posthorn_writer::Event;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The event's JSON payload.
#[derive(Serialize)]
pub struct OrderShipped<'a> {
    pub order_id: &'a str,
    pub carrier: &'a str,
}

/// Marks the order shipped and writes its event, both in the caller's transaction `tx`.
pub async fn ship_order(
    tx: &mut PgConnection,
    order_id: &str,
    carrier: &str,
) -> Result<Uuid, Error> {
    // The UPDATE locks the order's row, so events of one order are written, and published, in
    // the order their transactions commit.
    let shipped = sqlx::query(
        "UPDATE orders SET status = 'shipped', carrier = $2, version = version + 1 \
         WHERE id = $1 AND status = 'placed'",
    )
    .bind(order_id)
    .bind(carrier)
    .execute(&mut *tx)
    .await?;
    if shipped.rows_affected() == 0 {
        return Err(format!("order {order_id} is not waiting to be shipped").into());
    }
    let event = Event::builder("order", order_id, "OrderShipped")
        .json(&OrderShipped { order_id, carrier })
        .build()?;
    Ok(posthorn_writer::enqueue(tx, &event).await?)
}

/// What a request handler does: one transaction for the order's change and its event.
pub async fn handle_ship_request(
    pool: &PgPool,
    order_id: &str,
    carrier: &str,
) -> Result<Uuid, Error> {
    let mut tx = pool.begin().await?;
    let event_id = ship_order(&mut tx, order_id, carrier).await?;
    // Both or neither: the order is shipped and its event exists, or nothing happened.
    tx.commit().await?;
    Ok(event_id)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let pool = PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    create_orders(&pool, "order-42").await?;
    let event_id = handle_ship_request(&pool, "order-42", "DHL").await?;
    println!("order-42 shipped; event {event_id}");
    Ok(())
}

/// Demo set-up: an `orders` table with one order waiting to be shipped.
pub async fn create_orders(pool: &PgPool, order_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, status text NOT NULL, \
         carrier text, version int NOT NULL DEFAULT 0)",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO orders (id, status) VALUES ($1, 'placed') \
         ON CONFLICT (id) DO UPDATE SET status = 'placed'",
    )
    .bind(order_id)
    .execute(pool)
    .await?;
    Ok(())
}
