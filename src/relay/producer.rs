//! The one place that owns the relay's producer: it creates it, replaces it after a fatal
//! error, a failed record or a stall, and closes it, each with its event. A replaced producer
//! is closed at once and its successor created when the next record needs one, through the same
//! path as at start (connecting at once: its producer id is ready before the first batch).

use std::sync::Arc;

use crate::config::{Config, KafkaConfig, TopicTemplate};
use crate::events;
use crate::publisher::{Publisher, PublisherError};

use super::pipeline::ReplaceReason;

pub(crate) struct ProducerSlot {
    kafka: KafkaConfig,
    topic_template: TopicTemplate,
    /// `None` after the producer was closed; the next [`ProducerSlot::get`] creates one.
    /// Shared with the batch being published, which holds it until its last report.
    producer: Option<Arc<Publisher>>,
}

impl ProducerSlot {
    /// A slot with a producer in it, so that an invalid Kafka property is a start-up error.
    pub(crate) fn create(config: &Config) -> Result<ProducerSlot, PublisherError> {
        let mut slot = ProducerSlot {
            kafka: config.kafka.clone(),
            topic_template: config.topic_template.clone(),
            producer: None,
        };
        slot.get()?;
        Ok(slot)
    }

    /// The producer, created if there is none.
    pub(crate) fn get(&mut self) -> Result<Arc<Publisher>, PublisherError> {
        if let Some(producer) = &self.producer {
            return Ok(producer.clone());
        }
        let producer = Arc::new(Publisher::idempotent(&self.kafka, &self.topic_template)?);
        producer.connect_early();
        events::ProducerCreated {
            brokers: &self.kafka.brokers,
        }
        .emit();
        self.producer = Some(producer.clone());
        Ok(producer)
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
