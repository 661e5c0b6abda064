//! The one place that owns the relay's producer: it creates it, replaces it after a fatal
//! error, a failed record or a stall, and closes it, each with its event. A replaced producer
//! is closed at once and its successor created when the next record needs one, through the same
//! path as at start (connecting at once: its producer id is ready before the first batch).
//!
//! Exactly once: the producer is transactional, with the outbox's `transactional.id`. Each
//! leadership begins with [`ProducerSlot::lead`]: a fresh producer whose `init_transactions`
//! fences every older one (a frozen ex-leader's included) and aborts what it left open, then the
//! checkpoint topic's last committed record, which the relay records in Postgres before it
//! reads a row.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::checkpoint_record::CheckpointRecord;
use crate::config::{Config, Delivery, KafkaConfig, TestFault, TopicTemplate};
use crate::events;
use crate::outbox::{Outbox, OutboxError};
use crate::publisher::{
    ensure_checkpoint_topic, last_checkpoint, Publisher, PublisherError, TxnError, TxnSettings,
};

use super::pipeline::ReplaceReason;

pub(crate) struct ProducerSlot {
    kafka: KafkaConfig,
    topic_template: TopicTemplate,
    delivery: Delivery,
    exactly_once: ExactlyOnce,
    /// `None` after the producer was closed; the next [`ProducerSlot::get`] creates one.
    /// Shared with the batch being published, which holds it until its last report.
    producer: Option<Arc<Publisher>>,
}

/// What exactly-once's producers are made with.
struct ExactlyOnce {
    checkpoint_topic: String,
    transactional_id: Option<String>,
    table: String,
    test_fault: Option<TestFault>,
    /// Known from the first leadership on (read from Postgres).
    settings: Option<TxnSettings>,
    topic_ready: bool,
}

/// Why leading with exactly-once delivery could not begin.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LeadError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Publisher(#[from] PublisherError),
    #[error("Kafka transactions: {0}")]
    Txn(#[from] TxnError),
}

impl ProducerSlot {
    /// A slot with a producer in it, so that an invalid Kafka property is a start-up error.
    /// (Exactly once: the producer is made and dropped; a transactional one is made when
    /// leading, with the outbox's identity.)
    pub(crate) fn create(config: &Config) -> Result<ProducerSlot, PublisherError> {
        let mut slot = ProducerSlot {
            kafka: config.kafka.clone(),
            topic_template: config.topic_template.clone(),
            delivery: config.delivery,
            exactly_once: ExactlyOnce {
                checkpoint_topic: config.checkpoint_topic.clone(),
                transactional_id: config.transactional_id.clone(),
                table: format!("{}.{}", config.outbox.schema, config.outbox.table),
                test_fault: config.test_fault,
                settings: None,
                topic_ready: false,
            },
            producer: None,
        };
        match slot.delivery {
            Delivery::AtLeastOnce => {
                slot.get()?;
            }
            Delivery::ExactlyOnce => {
                let check = TxnSettings {
                    transactional_id: "posthorn-settings-check".to_owned(),
                    checkpoint_topic: config.checkpoint_topic.clone(),
                    outbox: uuid::Uuid::nil(),
                    table: config.outbox.qualified(),
                    epoch: 0,
                    counter: Arc::default(),
                    test_fault: None,
                };
                // Never initialised: it fences nothing.
                drop(Publisher::transactional(
                    &slot.kafka,
                    &slot.topic_template,
                    check,
                )?);
            }
        }
        Ok(slot)
    }

    /// The producer, created if there is none.
    pub(crate) fn get(&mut self) -> Result<Arc<Publisher>, PublisherError> {
        if let Some(producer) = &self.producer {
            return Ok(producer.clone());
        }
        let producer = match (self.delivery, &self.exactly_once.settings) {
            (Delivery::AtLeastOnce, _) => Publisher::idempotent(&self.kafka, &self.topic_template)?,
            (Delivery::ExactlyOnce, Some(settings)) => {
                Publisher::transactional(&self.kafka, &self.topic_template, settings.clone())?
            }
            (Delivery::ExactlyOnce, None) => {
                return Err(PublisherError::Create(
                    rdkafka::error::KafkaError::ClientCreation(
                        "exactly once: no producer before the first leadership".to_owned(),
                    ),
                ))
            }
        };
        let producer = Arc::new(producer);
        producer.connect_early();
        events::ProducerCreated {
            brokers: &self.kafka.brokers,
        }
        .emit();
        self.producer = Some(producer.clone());
        Ok(producer)
    }

    /// Exactly once, at the start of a leadership with `epoch` (nothing is running): a fresh
    /// transactional producer, initialised (every older producer of this outbox is fenced, and
    /// its open transaction aborted), and the checkpoint topic's last committed record, for the
    /// relay to record in Postgres before it reads. `None` at once with at-least-once delivery.
    pub(crate) async fn lead(
        &mut self,
        outbox: &Outbox,
        epoch: i64,
    ) -> Result<Option<CheckpointRecord>, LeadError> {
        if self.delivery == Delivery::AtLeastOnce {
            return Ok(None);
        }
        let eo = &mut self.exactly_once;
        let outbox_id = match &eo.settings {
            Some(settings) => settings.outbox,
            None => outbox.identity().await?,
        };
        // Transactions are numbered per epoch; leading again with the same epoch goes on.
        let counter = match &eo.settings {
            Some(settings) if settings.epoch == epoch => settings.counter.clone(),
            _ => Arc::new(AtomicU64::new(0)),
        };
        eo.settings = Some(TxnSettings {
            transactional_id: eo
                .transactional_id
                .clone()
                .unwrap_or_else(|| format!("posthorn-{outbox_id}")),
            checkpoint_topic: eo.checkpoint_topic.clone(),
            outbox: outbox_id,
            table: eo.table.clone(),
            epoch,
            counter,
            test_fault: eo.test_fault,
        });
        if !eo.topic_ready {
            ensure_checkpoint_topic(&self.kafka, &eo.checkpoint_topic).await?;
            eo.topic_ready = true;
        }
        let topic = eo.checkpoint_topic.clone();
        self.close();
        let producer = self.get()?;
        producer.init_transactions().await?;
        let last = last_checkpoint(&self.kafka, &topic, outbox_id).await?;
        if let Some(record) = &last {
            if record.epoch > epoch {
                // The lease table was reset (a restore), or an instance with a newer epoch
                // led: the init above fenced it either way, so its record is final.
                events::CheckpointFromNewerEpoch {
                    found: record.epoch,
                    epoch,
                }
                .emit();
            }
        }
        Ok(last)
    }

    /// The `transactional.id` in use (exactly once, once known).
    pub(crate) fn transactional_id(&self) -> Option<&str> {
        self.exactly_once
            .settings
            .as_ref()
            .map(|s| s.transactional_id.as_str())
    }

    /// A producer that no fatal error stopped: the one there is, or a new one.
    pub(crate) fn usable(&mut self) -> Result<Arc<Publisher>, PublisherError> {
        if let Some(fatal) = self.producer.as_ref().and_then(|p| p.fatal_error()) {
            self.replace(&ReplaceReason::Fatal(fatal));
        }
        self.get()
    }

    /// Closes the producer for `reason`; the next [`ProducerSlot::get`] creates a new one (new
    /// producer id, fresh sequence numbers).
    pub(crate) fn replace(&mut self, reason: &ReplaceReason) {
        self.producer = None;
        events::ProducerReplaced {
            reason: &reason.to_string(),
        }
        .emit();
    }

    /// Closes the producer: what it still holds is purged (never sent), and librdkafka's
    /// destructor runs on its polling thread, off the async runtime.
    pub(crate) fn close(&mut self) {
        if self.producer.take().is_some() {
            events::ProducerClosed.emit();
        }
    }
}
