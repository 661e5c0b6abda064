//! The producer's client: librdkafka's global errors routed to `events`, delivery reports to
//! each record's channel, and a polling thread of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext, PurgeConfig};
use tokio::sync::oneshot;

use crate::events;

/// Which of posthorn's Kafka clients librdkafka reports a global error for. The error goes to
/// `events` (rdkafka's default context would log it the same way); the producer's lost
/// connections count as Kafka reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KafkaClient {
    /// The relay's producer.
    Producer,
    /// The readiness probe's client: its errors are expected while a broker is down, and
    /// `/readyz` reports them.
    Probe,
    /// `posthorn check`'s producer: the command prints its verdict, nothing else.
    Check,
}

impl ClientContext for KafkaClient {
    fn error(&self, error: KafkaError, reason: &str) {
        match self {
            KafkaClient::Producer => events::ProducerClientError {
                error: &error,
                reason,
                connection_lost: error.rdkafka_error_code()
                    == Some(RDKafkaErrorCode::BrokerTransportFailure),
            }
            .emit(),
            KafkaClient::Probe | KafkaClient::Check => events::ProbeClientError {
                error: &error,
                reason,
            }
            .emit(),
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        let volume = match self {
            KafkaClient::Producer => events::LogVolume::AsLibrdkafkaSays,
            KafkaClient::Probe | KafkaClient::Check => events::LogVolume::Debug,
        };
        events::LibrdkafkaLog {
            level,
            facility,
            message,
            volume,
        }
        .emit();
    }
}

/// The checkpoint topic's reader (exactly once) is a consumer with the probe's context.
impl rdkafka::consumer::ConsumerContext for KafkaClient {}

/// Delivery reports go to the oneshot channel each record carries.
impl ProducerContext for KafkaClient {
    type DeliveryOpaque = Box<oneshot::Sender<Result<(), KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, report_to: Self::DeliveryOpaque) {
        let report = match result {
            Ok(_) => Ok(()),
            Err((err, _)) => Err(err.clone()),
        };
        // The batch may have stopped waiting (shutdown): nobody to tell.
        let _ = report_to.send(report);
    }
}

/// How long the polling thread waits for librdkafka's events per call. rdkafka's own
/// `ThreadedProducer` polls every 100 ms, and each `poll` busy-waits through its last
/// sub-millisecond (it truncates the remaining time to whole milliseconds, then polls with 0):
/// measured with perf, ~1% of a core on an idle relay. A longer wait costs nothing (an event
/// wakes it at once) and cuts that to ~0.1%; it bounds only how long a dropped producer's
/// thread takes to notice.
const POLL_WAIT: Duration = Duration::from_secs(1);

/// A `BaseProducer` with a thread of its own serving its events (delivery reports, errors).
pub(super) struct PolledProducer {
    pub(super) producer: Arc<BaseProducer<KafkaClient>>,
    stop: Arc<AtomicBool>,
}

impl PolledProducer {
    pub(super) fn new(
        config: &ClientConfig,
        client: KafkaClient,
    ) -> Result<PolledProducer, KafkaError> {
        let producer: Arc<BaseProducer<KafkaClient>> =
            Arc::new(config.create_with_context(client)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_producer, thread_stop) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-poll".to_owned())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    thread_producer.poll(POLL_WAIT);
                    // The in-flight gauge, sampled here: after each poll the reports it served
                    // are out of librdkafka's count, and an idle producer is sampled once per
                    // POLL_WAIT, so the gauge never keeps a settled batch's count. One call (a
                    // queue lock) per poll, not per record.
                    events::ProducerQueue {
                        n_in_flight: thread_producer.in_flight_count(),
                    }
                    .emit();
                }
                // The last reference may be this one: librdkafka's destructor (purge, then
                // up to 500 ms serving the purged records' reports) runs here, off the runtime.
            })
            .map_err(|err| {
                KafkaError::ClientCreation(format!("starting the poll thread: {err}"))
            })?;
        Ok(PolledProducer { producer, stop })
    }
}

impl Drop for PolledProducer {
    fn drop(&mut self) {
        // Nothing is written after this: what is queued or in flight fails as purged.
        self.producer
            .purge(PurgeConfig::default().queue().inflight().non_blocking());
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl std::ops::Deref for PolledProducer {
    type Target = BaseProducer<KafkaClient>;
    fn deref(&self) -> &Self::Target {
        &self.producer
    }
}
