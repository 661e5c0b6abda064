//! `/readyz`'s Kafka check: a light client of its own that asks a broker for the cluster's
//! brokers, never touching the relay's producer.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::{Client, ClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaConfig;

use super::client::KafkaClient;
use super::{creation_error, PublisherError};

/// A light Kafka client of its own that answers "does a broker answer?" for `/readyz`, without
/// touching the relay's producer.
pub(crate) struct KafkaProbe {
    client: Arc<AdminClient<KafkaClient>>,
    brokers: String,
}

impl KafkaProbe {
    /// Connects with the user's properties (security, SASL) but none of the producer's.
    pub(crate) fn new(kafka: &KafkaConfig) -> Result<KafkaProbe, PublisherError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &kafka.brokers);
        for (k, v) in &kafka.properties {
            config.set(k, v);
        }
        config.set("client.id", "posthorn-probe");
        let client: AdminClient<KafkaClient> = config
            .create_with_context(KafkaClient::Probe)
            .map_err(creation_error)?;
        Ok(KafkaProbe {
            client: Arc::new(client),
            brokers: kafka.brokers.clone(),
        })
    }

    /// Asks a broker for the cluster's brokers (no topics: cheap on clusters with thousands of
    /// them), waiting at most `timeout`. Returns how many brokers the cluster has.
    pub(crate) async fn check(&self, timeout: Duration) -> Result<usize, PublisherError> {
        let client = self.client.clone();
        let metadata =
            tokio::task::spawn_blocking(move || brokers_only_metadata(client.inner(), timeout))
                .await
                .unwrap_or(Err(KafkaError::Canceled));
        metadata.map_err(|source| PublisherError::Metadata {
            brokers: self.brokers.clone(),
            source,
        })
    }
}

/// A metadata request for brokers only. rdkafka's safe `fetch_metadata` asks for one topic or
/// for all of them; librdkafka asks for none when given `all_topics = 0` and no topic handle
/// on a client that knows no topics, as the probe's client never does.
pub(super) fn brokers_only_metadata<C: ClientContext>(
    client: &Client<C>,
    timeout: Duration,
) -> Result<usize, KafkaError> {
    use rdkafka::bindings as rd;
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let mut metadata: *const rd::rd_kafka_metadata = std::ptr::null();
    // SAFETY: `native_ptr` is a live rd_kafka_t for as long as `client` is borrowed, and
    // `metadata` is a valid out-pointer; librdkafka blocks for at most `timeout_ms`.
    let code = unsafe {
        rd::rd_kafka_metadata(
            client.native_ptr(),
            0,
            std::ptr::null_mut(),
            &mut metadata,
            timeout_ms,
        )
    };
    if code != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(KafkaError::MetadataFetch(code.into()));
    }
    if metadata.is_null() {
        return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::Fail));
    }
    // SAFETY: on success librdkafka set `metadata` to a structure we own until we pass it to
    // rd_kafka_metadata_destroy, once, after the last read.
    let n_brokers = unsafe { (*metadata).broker_cnt };
    unsafe { rd::rd_kafka_metadata_destroy(metadata) };
    Ok(usize::try_from(n_brokers).unwrap_or(0))
}
