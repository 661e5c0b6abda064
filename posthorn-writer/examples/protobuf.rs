// Protobuf payloads: encode a message with prost and write it as bytes with its content type.
//
//     DATABASE_URL=postgres://... cargo run -p posthorn-writer --example protobuf
//
// The relay publishes the bytes exactly as stored, with `content-type: application/x-protobuf`;
// a consumer decodes the value with the same message type.

use posthorn_writer::{Event, WriteError};
use prost::Message;
use sqlx::PgPool;
use uuid::Uuid;

/// The payload, as prost-build would generate it from
///
///     message OrderShipped { string order_id = 1; string carrier = 2; uint32 parcels = 3; }
///
/// (written by hand here, so no `protoc` is needed).
#[derive(Clone, PartialEq, prost::Message)]
pub struct OrderShipped {
    #[prost(string, tag = "1")]
    pub order_id: String,
    #[prost(string, tag = "2")]
    pub carrier: String,
    #[prost(uint32, tag = "3")]
    pub parcels: u32,
}

pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// The event for `shipped`, its payload protobuf-encoded.
pub fn order_shipped_event(shipped: &OrderShipped) -> Result<Event, WriteError> {
    Event::builder("order", shipped.order_id.as_str(), "OrderShipped")
        .bytes(shipped.encode_to_vec(), CONTENT_TYPE)
        .build()
}

/// Writes the event in a transaction of its own (in a service: the one making the change).
pub async fn write_order_shipped(
    pool: &PgPool,
    shipped: &OrderShipped,
) -> Result<Uuid, Box<dyn std::error::Error + Send + Sync>> {
    let mut tx = pool.begin().await?;
    // ... the business change goes here, in `tx` ...
    let event_id = posthorn_writer::enqueue(&mut tx, &order_shipped_event(shipped)?).await?;
    tx.commit().await?;
    Ok(event_id)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let pool = PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    let shipped = OrderShipped {
        order_id: "order-42".into(),
        carrier: "DHL".into(),
        parcels: 2,
    };
    let event_id = write_order_shipped(&pool, &shipped).await?;
    println!("event {event_id}: {} protobuf bytes", shipped.encoded_len());
    Ok(())
}
