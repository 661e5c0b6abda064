//! Configuration: every `POSTHORN_*` environment variable, parsed and validated once at start.
//!
//! `envy` reads the known variables into [`RawEnv`] as plain strings; each one is then validated
//! here so that a bad value is reported as one line naming the variable, what is wrong and a
//! valid example. Values that may hold secrets (the database URL, Kafka passwords) are never
//! echoed back: errors and `Debug` output show their redacted form.
//!
//! Any `POSTHORN_KAFKA_<PROPERTY>` other than `POSTHORN_KAFKA_BROKERS` is passed to librdkafka as
//! `<property>` lowercased with `_` replaced by `.` (the Confluent images' convention).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// Prefix of every variable posthorn reads.
pub const PREFIX: &str = "POSTHORN_";
/// Prefix of the variables passed through to librdkafka.
pub const KAFKA_PREFIX: &str = "POSTHORN_KAFKA_";

/// A configuration problem: exits with status 2 and this one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: {problem} (example: {var}={example})")]
    Invalid {
        var: String,
        problem: String,
        example: &'static str,
    },
    #[error("{var}: not set, and it is required (example: {var}={example})")]
    Missing { var: String, example: &'static str },
}

impl ConfigError {
    fn invalid(var: &str, problem: impl Into<String>, example: &'static str) -> Self {
        ConfigError::Invalid {
            var: var.to_owned(),
            problem: problem.into(),
            example,
        }
    }
}

/// The variables as `envy` finds them; validated by [`Config::from_vars`].
#[derive(Debug, Default, Deserialize)]
struct RawEnv {
    database_url: Option<String>,
    kafka_brokers: Option<String>,
    schema: Option<String>,
    table: Option<String>,
    topic_template: Option<String>,
    batch_size: Option<String>,
    poll_interval_ms: Option<String>,
    shutdown_timeout_ms: Option<String>,
    log_format: Option<String>,
    log: Option<String>,
    on_poison: Option<String>,
    dead_letter_topic: Option<String>,
    lease_ttl: Option<String>,
    instance_id: Option<String>,
    ack_stall_ms: Option<String>,
    http_addr: Option<String>,
    health_stall_seconds: Option<String>,
    retention: Option<String>,
    tracking: Option<String>,
    delivery: Option<String>,
    checkpoint_topic: Option<String>,
    transactional_id: Option<String>,
    test_fault: Option<String>,
}

/// Names of the variables [`RawEnv`] knows, for the unknown-variable warning.
const KNOWN_VARS: &[&str] = &[
    "DATABASE_URL",
    "KAFKA_BROKERS",
    "SCHEMA",
    "TABLE",
    "TOPIC_TEMPLATE",
    "BATCH_SIZE",
    "POLL_INTERVAL_MS",
    "SHUTDOWN_TIMEOUT_MS",
    "LOG_FORMAT",
    "LOG",
    "ON_POISON",
    "DEAD_LETTER_TOPIC",
    "LEASE_TTL",
    "INSTANCE_ID",
    "ACK_STALL_MS",
    "HTTP_ADDR",
    "HEALTH_STALL_SECONDS",
    "RETENTION",
    "TRACKING",
    "DELIVERY",
    "CHECKPOINT_TOPIC",
    "TRANSACTIONAL_ID",
    "TEST_FAULT",
];

const EX_DATABASE_URL: &str = "postgres://posthorn:secret@127.0.0.1:5432/app";
const EX_BROKERS: &str = "kafka-1:9092,kafka-2:9092";

/// Everything posthorn needs to run, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub outbox: OutboxTable,
    pub topic_template: TopicTemplate,
    /// Rows read, published and marked per batch.
    pub batch_size: usize,
    /// How often the relay looks for rows when no notification arrives.
    pub poll_interval: Duration,
    /// How long a stopping relay waits for in-flight acknowledgements.
    pub shutdown_timeout: Duration,
    pub log: LogConfig,
    /// What happens to a row Kafka will never accept, and to later rows of its aggregate.
    pub on_poison: PoisonPolicy,
    /// Where `dead-letter` publishes poison rows (none: they are only marked failed).
    pub dead_letter_topic: Option<String>,
    /// The longest a standby waits to take over from a leader that died.
    pub lease_ttl: Duration,
    /// This instance's name in the lease (default: host name, process id and a random suffix).
    pub instance_id: String,
    /// How long a batch may go without any acknowledgement before the producer is replaced.
    pub ack_stall: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub http_addr: SocketAddr,
    /// How long the relay loop may go without a progress check before `/healthz` fails.
    pub health_stall: Duration,
    /// How long delivered rows are kept before they are deleted (none: never deleted).
    pub retention: Option<Duration>,
    /// How the relay records what it published: per row, or with one snapshot checkpoint.
    pub tracking: Tracking,
    /// At least once (idempotent producer) or exactly once (a Kafka transaction per batch).
    pub delivery: Delivery,
    /// Exactly once: the compacted topic holding the outbox's last committed checkpoint
    /// (default `posthorn-checkpoint.<schema>.<table>`).
    pub checkpoint_topic: String,
    /// Exactly once: the producer's `transactional.id`, shared by every replica of this outbox
    /// (default: `posthorn-` and the outbox's identity, read from `<table>_identity`).
    pub transactional_id: Option<String>,
    /// A test-only fault point (`POSTHORN_TEST_FAULT`); never set in production.
    pub test_fault: Option<TestFault>,
    /// `POSTHORN_*` variables that posthorn does not know (typos, or injected by an orchestrator).
    pub unknown_vars: Vec<String>,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(std::env::vars())
    }

    /// Reads the given variables as if they were the environment (tests pass their own).
    pub fn from_vars<I>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(PREFIX))
            .collect();
        // Every field is an optional string, so envy cannot fail on a value; typed parsing and
        // its messages are ours below.
        let raw: RawEnv = envy::prefixed(PREFIX)
            .from_iter(vars.iter().cloned())
            .map_err(|err| ConfigError::invalid("POSTHORN_*", err.to_string(), "see README"))?;

        let database = DatabaseConfig::parse(required(
            raw.database_url,
            "POSTHORN_DATABASE_URL",
            EX_DATABASE_URL,
        )?)?;
        let brokers = required(raw.kafka_brokers, "POSTHORN_KAFKA_BROKERS", EX_BROKERS)?;
        let kafka = KafkaConfig::parse(brokers, &vars)?;
        let outbox = OutboxTable::parse(raw.schema, raw.table)?;
        let topic_template = TopicTemplate::parse(
            raw.topic_template.as_deref().unwrap_or("{aggregate_type}"),
            "POSTHORN_TOPIC_TEMPLATE",
        )?;
        let batch_size = parse_number(
            raw.batch_size.as_deref(),
            "POSTHORN_BATCH_SIZE",
            1000,
            1..=100_000,
            "1000",
        )? as usize;
        let poll_interval = Duration::from_millis(parse_number(
            raw.poll_interval_ms.as_deref(),
            "POSTHORN_POLL_INTERVAL_MS",
            1000,
            10..=3_600_000,
            "1000",
        )?);
        let shutdown_timeout = Duration::from_millis(parse_number(
            raw.shutdown_timeout_ms.as_deref(),
            "POSTHORN_SHUTDOWN_TIMEOUT_MS",
            10_000,
            0..=600_000,
            "10000",
        )?);
        let log = LogConfig::parse(raw.log_format.as_deref(), raw.log)?;
        let on_poison = PoisonPolicy::parse(raw.on_poison.as_deref())?;
        let dead_letter_topic = match raw.dead_letter_topic.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(topic) => {
                if let Some(problem) = topic_name_problem(topic) {
                    return Err(ConfigError::invalid(
                        "POSTHORN_DEAD_LETTER_TOPIC",
                        problem,
                        "orders.outbox.dlq",
                    ));
                }
                if on_poison == PoisonPolicy::HaltKey {
                    return Err(ConfigError::invalid(
                        "POSTHORN_DEAD_LETTER_TOPIC",
                        "is only used with POSTHORN_ON_POISON=dead-letter, but it is halt-key",
                        "orders.outbox.dlq",
                    ));
                }
                Some(topic.to_owned())
            }
        };

        let lease_ttl = match raw.lease_ttl.as_deref() {
            None => Duration::from_secs(10),
            Some(v) => humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| *d >= Duration::from_secs(1) && *d <= Duration::from_secs(300))
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "POSTHORN_LEASE_TTL",
                        format!("'{v}' is not a duration from 1s to 300s (units: ms, s, m)"),
                        "10s",
                    )
                })?,
        };
        let ack_stall = Duration::from_millis(parse_number(
            raw.ack_stall_ms.as_deref(),
            "POSTHORN_ACK_STALL_MS",
            60_000,
            1_000..=3_600_000,
            "60000",
        )?);
        let instance_id = match raw.instance_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => default_instance_id(),
        };
        let http_addr = parse_http_addr(raw.http_addr.as_deref())?;
        let health_stall = Duration::from_secs(parse_number(
            raw.health_stall_seconds.as_deref(),
            "POSTHORN_HEALTH_STALL_SECONDS",
            60,
            1..=86_400,
            "60",
        )?);
        let retention = parse_retention(raw.retention.as_deref())?;
        let tracking = Tracking::parse(raw.tracking.as_deref())?;
        let delivery = Delivery::parse(raw.delivery.as_deref(), tracking)?;
        let checkpoint_topic = match raw.checkpoint_topic.as_deref().map(str::trim) {
            Some(topic) if !topic.is_empty() => {
                if let Some(problem) = topic_name_problem(topic) {
                    return Err(ConfigError::invalid(
                        "POSTHORN_CHECKPOINT_TOPIC",
                        problem,
                        "posthorn-checkpoint.public.outbox",
                    ));
                }
                topic.to_owned()
            }
            _ => outbox.default_checkpoint_topic(),
        };
        let transactional_id = match raw.transactional_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => Some(id.to_owned()),
            _ => None,
        };
        let test_fault = TestFault::parse(raw.test_fault.as_deref())?;

        let unknown_vars = vars
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !k.starts_with(KAFKA_PREFIX))
            .filter(|k| !KNOWN_VARS.contains(&&k[PREFIX.len()..]))
            .cloned()
            .collect();

        Ok(Config {
            database,
            kafka,
            outbox,
            topic_template,
            batch_size,
            poll_interval,
            shutdown_timeout,
            log,
            on_poison,
            dead_letter_topic,
            lease_ttl,
            instance_id,
            ack_stall,
            http_addr,
            health_stall,
            retention,
            tracking,
            delivery,
            checkpoint_topic,
            transactional_id,
            test_fault,
            unknown_vars,
        })
    }
}

/// `host-pid-rand`: unique per process, and says where it runs (in Kubernetes the host name is
/// the pod's name).
fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| "posthorn".to_owned());
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    format!("{host}-{}-{suffix}", std::process::id())
}

fn parse_http_addr(value: Option<&str>) -> Result<SocketAddr, ConfigError> {
    const DEFAULT: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9187);
    let Some(value) = value.map(str::trim) else {
        return Ok(DEFAULT);
    };
    value.parse().map_err(|_| {
        ConfigError::invalid(
            "POSTHORN_HTTP_ADDR",
            format!("'{value}' is not an IP address and port (IPv6 in brackets: [::]:9187)"),
            "0.0.0.0:9187",
        )
    })
}

/// `POSTHORN_RETENTION`: a duration such as `7d`, `12h`, `30m` or `0` (delete as soon as
/// delivered), or `off` (never delete). Default 7 days.
fn parse_retention(value: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    const DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);
    let value = match value.map(str::trim) {
        None => return Ok(Some(DEFAULT)),
        Some("off") => return Ok(None),
        Some(v) => v,
    };
    humantime::parse_duration(value).map(Some).map_err(|_| {
        ConfigError::invalid(
            "POSTHORN_RETENTION",
            format!(
                "'{value}' is not a duration such as 7d, 12h, 30m or 0 (delete at once), or off"
            ),
            "7d",
        )
    })
}

fn required(
    value: Option<String>,
    var: &str,
    example: &'static str,
) -> Result<String, ConfigError> {
    match value {
        Some(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => Err(ConfigError::Missing {
            var: var.to_owned(),
            example,
        }),
    }
}

fn parse_number(
    value: Option<&str>,
    var: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
    example: &'static str,
) -> Result<u64, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let problem = || {
        format!(
            "'{value}' is not a whole number from {} to {}",
            range.start(),
            range.end()
        )
    };
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| ConfigError::invalid(var, problem(), example))?;
    if !range.contains(&n) {
        return Err(ConfigError::invalid(var, problem(), example));
    }
    Ok(n)
}

/// The Postgres connection. `Debug` and [`DatabaseConfig::redacted`] never show the password.
#[derive(Clone)]
pub struct DatabaseConfig {
    url: String,
    redacted: String,
}

impl DatabaseConfig {
    fn parse(url: String) -> Result<DatabaseConfig, ConfigError> {
        const VAR: &str = "POSTHORN_DATABASE_URL";
        // The value itself is never echoed: it may contain a password.
        let parsed = url::Url::parse(&url).map_err(|err| {
            ConfigError::invalid(VAR, format!("not a valid URL ({err})"), EX_DATABASE_URL)
        })?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(ConfigError::invalid(
                VAR,
                format!(
                    "scheme '{}' is not postgres:// or postgresql://",
                    parsed.scheme()
                ),
                EX_DATABASE_URL,
            ));
        }
        if parsed.host_str().is_none_or(str::is_empty) && !url.contains("host=") {
            return Err(ConfigError::invalid(
                VAR,
                "the URL names no host",
                EX_DATABASE_URL,
            ));
        }
        let mut redacted = parsed.clone();
        if redacted.password().is_some() {
            // set_password only fails for URLs that cannot have credentials.
            let _ = redacted.set_password(Some("***"));
        }
        let query_has_password = parsed
            .query_pairs()
            .any(|(k, _)| k.eq_ignore_ascii_case("password"));
        if query_has_password {
            let pairs: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k.eq_ignore_ascii_case("password") {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            redacted.query_pairs_mut().clear().extend_pairs(pairs);
        }
        Ok(DatabaseConfig {
            url,
            redacted: redacted.to_string(),
        })
    }

    /// The URL with its password (if any) in it: pass to the driver, never to a log.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with the password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseConfig")
            .field(&self.redacted)
            .finish()
    }
}

/// Kafka bootstrap servers and librdkafka properties from `POSTHORN_KAFKA_*`.
#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    /// librdkafka property → value, from `POSTHORN_KAFKA_<PROPERTY>`; applied after posthorn's
    /// own defaults, so they override them.
    pub properties: BTreeMap<String, String>,
}

/// Properties posthorn's promise depends on: a user may not weaken them.
const PINNED_PROPERTIES: &[(&str, &str, &str)] = &[
    (
        "enable.idempotence",
        "true",
        "posthorn's ordering and no-duplicate promise needs the idempotent producer",
    ),
    (
        "acks",
        "all",
        "a row is marked delivered only once every in-sync replica has it",
    ),
];

impl KafkaConfig {
    fn parse(brokers: String, vars: &[(String, String)]) -> Result<KafkaConfig, ConfigError> {
        if brokers.split(',').any(|b| b.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "POSTHORN_KAFKA_BROKERS",
                "an empty broker address in the list",
                EX_BROKERS,
            ));
        }
        let mut properties = BTreeMap::new();
        for (var, value) in vars {
            let Some(name) = var.strip_prefix(KAFKA_PREFIX) else {
                continue;
            };
            if name == "BROKERS" {
                continue;
            }
            let property = kafka_property_name(name);
            if property == "transactional.id" {
                return Err(ConfigError::invalid(
                    var,
                    "set it with POSTHORN_TRANSACTIONAL_ID (used with POSTHORN_DELIVERY=exactly-once)",
                    "POSTHORN_TRANSACTIONAL_ID=posthorn-orders",
                ));
            }
            if property == "bootstrap.servers" {
                return Err(ConfigError::invalid(
                    var,
                    "set the brokers with POSTHORN_KAFKA_BROKERS instead",
                    EX_BROKERS,
                ));
            }
            if let Some((_, required, why)) =
                PINNED_PROPERTIES.iter().find(|(p, _, _)| *p == property)
            {
                let normalized = value.trim().to_ascii_lowercase();
                let same = normalized == *required || (property == "acks" && normalized == "-1");
                if !same {
                    return Err(ConfigError::Invalid {
                        var: var.clone(),
                        problem: format!("must be {required}: {why}"),
                        example: required,
                    });
                }
            }
            properties.insert(property, value.clone());
        }
        Ok(KafkaConfig {
            brokers,
            properties,
        })
    }
}

/// `SECURITY_PROTOCOL` → `security.protocol`.
pub fn kafka_property_name(var_suffix: &str) -> String {
    var_suffix.to_ascii_lowercase().replace('_', ".")
}

/// `security.protocol` → `POSTHORN_KAFKA_SECURITY_PROTOCOL`.
pub fn kafka_property_var(property: &str) -> String {
    format!(
        "{KAFKA_PREFIX}{}",
        property.to_ascii_uppercase().replace('.', "_")
    )
}

/// Whether a librdkafka property holds a secret, so its value is never shown.
pub fn is_secret_property(property: &str) -> bool {
    property.contains("password") || property.contains("secret") || property.ends_with(".pem")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &shown)
            .finish()
    }
}

/// The outbox table's schema and name: simple lowercase SQL identifiers, always quoted in SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTable {
    pub schema: String,
    pub table: String,
}

impl OutboxTable {
    fn parse(schema: Option<String>, table: Option<String>) -> Result<OutboxTable, ConfigError> {
        let schema = schema.unwrap_or_else(|| "public".to_owned());
        let table = table.unwrap_or_else(|| "outbox".to_owned());
        check_identifier(&schema, "POSTHORN_SCHEMA", "public")?;
        check_identifier(&table, "POSTHORN_TABLE", "outbox")?;
        let outbox = OutboxTable { schema, table };
        // Postgres channel names are identifiers: 63 bytes at most.
        if outbox.channel().len() > 63 {
            return Err(ConfigError::invalid(
                "POSTHORN_TABLE",
                format!(
                    "the notification channel '{}' would be longer than Postgres' 63 bytes; \
                     use a shorter schema or table name",
                    outbox.channel()
                ),
                "outbox",
            ));
        }
        Ok(outbox)
    }

    /// `"schema"."table"`, ready to splice into SQL (both are validated identifiers).
    pub fn qualified(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema, self.table)
    }

    /// The LISTEN/NOTIFY channel the outbox trigger notifies: `posthorn.<schema>.<table>`.
    pub fn channel(&self) -> String {
        format!("posthorn.{}.{}", self.schema, self.table)
    }

    /// Exactly once's checkpoint topic unless `POSTHORN_CHECKPOINT_TOPIC` names another:
    /// `posthorn-checkpoint.<schema>.<table>` (identifiers are valid topic characters).
    pub fn default_checkpoint_topic(&self) -> String {
        format!("posthorn-checkpoint.{}.{}", self.schema, self.table)
    }
}

fn check_identifier(value: &str, var: &str, example: &'static str) -> Result<(), ConfigError> {
    if !posthorn_writer::contract::is_identifier(value) {
        return Err(ConfigError::invalid(
            var,
            format!("'{value}' is not a lowercase SQL identifier (a-z, 0-9, _; at most 63 bytes; not starting with a digit)"),
            example,
        ));
    }
    Ok(())
}

/// The topic a row goes to when its `topic` column is NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    AggregateType,
    EventType,
}

impl TopicTemplate {
    pub fn parse(template: &str, var: &str) -> Result<TopicTemplate, ConfigError> {
        const EXAMPLE: &str = "events.{aggregate_type}";
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(ConfigError::invalid(var, "an unclosed '{'", EXAMPLE));
            };
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "aggregate_type" => TemplatePart::AggregateType,
                "event_type" => TemplatePart::EventType,
                other => {
                    return Err(ConfigError::invalid(
                        var,
                        format!(
                            "unknown placeholder '{{{other}}}'; use {{aggregate_type}} or {{event_type}}"
                        ),
                        EXAMPLE,
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err(ConfigError::invalid(var, "empty template", EXAMPLE));
        }
        let literal: String = parts
            .iter()
            .filter_map(|p| match p {
                TemplatePart::Literal(s) => Some(s.as_str()),
                _ => None,
            })
            .collect();
        if !literal.chars().all(is_topic_char) {
            return Err(ConfigError::invalid(
                var,
                "topic names may only contain a-z, A-Z, 0-9, '.', '_' and '-'",
                EXAMPLE,
            ));
        }
        Ok(TopicTemplate { parts })
    }

    /// The topic for a row with these aggregate and event types.
    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut topic = String::with_capacity(32);
        for part in &self.parts {
            match part {
                TemplatePart::Literal(s) => topic.push_str(s),
                TemplatePart::AggregateType => topic.push_str(aggregate_type),
                TemplatePart::EventType => topic.push_str(event_type),
            }
        }
        topic
    }
}

use posthorn_writer::contract::is_topic_char;

/// Why a topic name is not one Kafka accepts, if it is not (the contract's rule).
pub fn topic_name_problem(topic: &str) -> Option<String> {
    posthorn_writer::contract::topic_name_problem(topic).map(|problem| problem.to_string())
}

/// `POSTHORN_TRACKING`: how the relay records what it has published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// `delivered_at` is written on every row once Kafka acknowledged it.
    Rows,
    /// One checkpoint row records the last published snapshot (and the position inside the
    /// window being published): a batch is the rows of the transactions that committed between
    /// two snapshots, and no row is written a second time.
    Checkpoint,
}

impl Tracking {
    fn parse(value: Option<&str>) -> Result<Tracking, ConfigError> {
        match value.map(str::trim) {
            None | Some("rows") => Ok(Tracking::Rows),
            Some("checkpoint") => Ok(Tracking::Checkpoint),
            Some(other) => Err(ConfigError::invalid(
                "POSTHORN_TRACKING",
                format!("'{other}' is neither 'rows' nor 'checkpoint'"),
                "checkpoint",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tracking::Rows => "rows",
            Tracking::Checkpoint => "checkpoint",
        }
    }
}

/// `POSTHORN_DELIVERY`: what a consumer of the topics may count on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The idempotent producer: every committed row at least once; a crash or a failover may
    /// publish the last batches again.
    AtLeastOnce,
    /// One Kafka transaction per batch, with a checkpoint record in the same transaction and
    /// the producer fenced by its `transactional.id`: a `read_committed` consumer sees every
    /// committed row once. Requires `POSTHORN_TRACKING=checkpoint`.
    ExactlyOnce,
}

impl std::str::FromStr for Delivery {
    type Err = String;

    fn from_str(value: &str) -> Result<Delivery, String> {
        match value.trim() {
            "at-least-once" => Ok(Delivery::AtLeastOnce),
            "exactly-once" => Ok(Delivery::ExactlyOnce),
            other => Err(format!(
                "'{other}' is neither 'at-least-once' nor 'exactly-once'"
            )),
        }
    }
}

impl Delivery {
    fn parse(value: Option<&str>, tracking: Tracking) -> Result<Delivery, ConfigError> {
        let delivery = match value {
            None => Delivery::AtLeastOnce,
            Some(value) => value.parse().map_err(|problem: String| {
                ConfigError::invalid("POSTHORN_DELIVERY", problem, "exactly-once")
            })?,
        };
        if delivery == Delivery::ExactlyOnce && tracking != Tracking::Checkpoint {
            return Err(ConfigError::invalid(
                "POSTHORN_DELIVERY",
                "exactly-once needs POSTHORN_TRACKING=checkpoint: a re-queued row then comes \
                 back under a new id, so a checkpoint record naming ids can never mark it again",
                "exactly-once (with POSTHORN_TRACKING=checkpoint)",
            ));
        }
        Ok(delivery)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::ExactlyOnce => "exactly-once",
        }
    }
}

/// `POSTHORN_TEST_FAULT`: a fault point for the test suite, `<point>:<n>` (at the n-th Kafka
/// commit). Not for production: it kills or stops the process on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestFault {
    /// Abort the process right after the n-th commit, before Postgres records it.
    CrashAfterCommit(u64),
    /// SIGSTOP the process right before the n-th commit (after every check that it still
    /// leads), so that a test can freeze a leader at its worst moment.
    StopBeforeCommit(u64),
}

impl TestFault {
    fn parse(value: Option<&str>) -> Result<Option<TestFault>, ConfigError> {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let bad = || {
            ConfigError::invalid(
                "POSTHORN_TEST_FAULT",
                format!("'{value}' is not crash-after-commit:<n> or stop-before-commit:<n>"),
                "crash-after-commit:3",
            )
        };
        let (point, n) = value.split_once(':').ok_or_else(bad)?;
        let n: u64 = n.trim().parse().map_err(|_| bad())?;
        match point.trim() {
            "crash-after-commit" => Ok(Some(TestFault::CrashAfterCommit(n))),
            "stop-before-commit" => Ok(Some(TestFault::StopBeforeCommit(n))),
            _ => Err(bad()),
        }
    }
}

/// `POSTHORN_ON_POISON`: what a row Kafka will never accept does to its aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonPolicy {
    /// The row is marked failed (and published to the dead-letter topic, if one is set); later
    /// rows of its aggregate go on.
    DeadLetter,
    /// The row is marked failed and later rows of its aggregate wait until an operator re-queues
    /// or resolves it; other aggregates go on.
    HaltKey,
}

impl PoisonPolicy {
    fn parse(value: Option<&str>) -> Result<PoisonPolicy, ConfigError> {
        match value.map(str::trim) {
            None | Some("dead-letter") => Ok(PoisonPolicy::DeadLetter),
            Some("halt-key") => Ok(PoisonPolicy::HaltKey),
            Some(other) => Err(ConfigError::invalid(
                "POSTHORN_ON_POISON",
                format!("'{other}' is neither 'dead-letter' nor 'halt-key'"),
                "halt-key",
            )),
        }
    }
}

/// `POSTHORN_LOG`'s default. sqlx logs each connection a Postgres outage breaks (the server's
/// notice, a failed ping, a slow acquire): posthorn's own events already say that Postgres is
/// failing, once, so sqlx speaks only of errors.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=error,sqlx_core=error";

/// Log output settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `posthorn=debug,rdkafka=warn`.
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogConfig {
    fn parse(format: Option<&str>, filter: Option<String>) -> Result<LogConfig, ConfigError> {
        let format = match format.map(str::trim) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "POSTHORN_LOG_FORMAT",
                    format!("'{other}' is neither 'text' nor 'json'"),
                    "json",
                ))
            }
        };
        let filter = filter.unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned());
        if tracing_subscriber::EnvFilter::try_new(&filter).is_err() {
            return Err(ConfigError::invalid(
                "POSTHORN_LOG",
                format!("'{filter}' is not a log filter"),
                "info,posthorn=debug",
            ));
        }
        Ok(LogConfig { format, filter })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = vec![
            (
                "POSTHORN_DATABASE_URL".into(),
                "postgres://u:hunter2@db:5432/app".into(),
            ),
            ("POSTHORN_KAFKA_BROKERS".into(), "k:9092".into()),
        ];
        for (k, val) in pairs {
            v.retain(|(existing, _)| existing != k);
            v.push(((*k).to_owned(), (*val).to_owned()));
        }
        v
    }

    #[test]
    fn defaults_apply_when_only_the_required_variables_are_set() {
        let c = Config::from_vars(vars(&[])).expect("valid");
        assert_eq!(c.outbox.qualified(), "\"public\".\"outbox\"");
        assert_eq!(c.outbox.channel(), "posthorn.public.outbox");
        assert_eq!(c.batch_size, 1000);
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert_eq!(c.topic_template.render("order", "Shipped"), "order");
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.http_addr.to_string(), "0.0.0.0:9187");
        assert_eq!(c.health_stall, Duration::from_secs(60));
        assert_eq!(c.retention, Some(Duration::from_secs(7 * 24 * 3600)));
        assert!(c.unknown_vars.is_empty());
    }

    #[test]
    fn the_http_address_is_an_ip_and_port() {
        let c = Config::from_vars(vars(&[("POSTHORN_HTTP_ADDR", "127.0.0.1:0")])).expect("valid");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:0");
        let c = Config::from_vars(vars(&[("POSTHORN_HTTP_ADDR", "[::]:9187")])).expect("valid");
        assert!(c.http_addr.is_ipv6());
        let msg = Config::from_vars(vars(&[("POSTHORN_HTTP_ADDR", "localhost")]))
            .expect_err("no port")
            .to_string();
        assert_eq!(
            msg,
            "POSTHORN_HTTP_ADDR: 'localhost' is not an IP address and port (IPv6 in brackets: [::]:9187) (example: POSTHORN_HTTP_ADDR=0.0.0.0:9187)"
        );
    }

    #[test]
    fn the_health_stall_is_a_number_of_seconds() {
        let c = Config::from_vars(vars(&[("POSTHORN_HEALTH_STALL_SECONDS", "5")])).expect("ok");
        assert_eq!(c.health_stall, Duration::from_secs(5));
        let msg = Config::from_vars(vars(&[("POSTHORN_HEALTH_STALL_SECONDS", "0")]))
            .expect_err("zero")
            .to_string();
        assert!(
            msg.starts_with("POSTHORN_HEALTH_STALL_SECONDS: '0'"),
            "{msg}"
        );
    }

    #[test]
    fn retention_takes_durations_zero_and_off() {
        let retention =
            |v: &str| Config::from_vars(vars(&[("POSTHORN_RETENTION", v)])).map(|c| c.retention);
        let hours = |h: u64| Some(Duration::from_secs(h * 3600));
        assert_eq!(retention("7d").expect("7d"), hours(7 * 24));
        assert_eq!(retention("12h").expect("12h"), hours(12));
        assert_eq!(
            retention("30m").expect("30m"),
            Some(Duration::from_secs(30 * 60))
        );
        assert_eq!(
            retention("1h 30m").expect("1h 30m"),
            Some(Duration::from_secs(5400))
        );
        assert_eq!(retention("0").expect("0"), Some(Duration::ZERO));
        assert_eq!(retention(" off ").expect("off"), None);
        for bad in ["7", "seven days", "-1d", ""] {
            let msg = retention(bad).expect_err(bad).to_string();
            assert!(msg.starts_with("POSTHORN_RETENTION: '"), "{msg}");
            assert!(msg.ends_with("(example: POSTHORN_RETENTION=7d)"), "{msg}");
        }
    }

    #[test]
    fn a_missing_required_variable_is_named_with_an_example() {
        let err = Config::from_vars(vec![("POSTHORN_KAFKA_BROKERS".into(), "k:9092".into())])
            .expect_err("missing database url");
        let msg = err.to_string();
        assert!(msg.starts_with("POSTHORN_DATABASE_URL: not set"), "{msg}");
        assert!(
            msg.contains("example: POSTHORN_DATABASE_URL=postgres://"),
            "{msg}"
        );
    }

    #[test]
    fn a_malformed_number_is_named_with_its_range_and_an_example() {
        let msg = Config::from_vars(vars(&[("POSTHORN_BATCH_SIZE", "lots")]))
            .expect_err("bad")
            .to_string();
        assert_eq!(
            msg,
            "POSTHORN_BATCH_SIZE: 'lots' is not a whole number from 1 to 100000 (example: POSTHORN_BATCH_SIZE=1000)"
        );
        assert!(Config::from_vars(vars(&[("POSTHORN_BATCH_SIZE", "0")])).is_err());
    }

    #[test]
    fn database_url_errors_and_debug_output_never_show_the_password() {
        let err = Config::from_vars(vars(&[(
            "POSTHORN_DATABASE_URL",
            "mysql://u:hunter2@db/app",
        )]))
        .expect_err("wrong scheme")
        .to_string();
        assert!(err.contains("POSTHORN_DATABASE_URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");

        let err = Config::from_vars(vars(&[("POSTHORN_DATABASE_URL", "hunter2 not a url")]))
            .expect_err("not a url")
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");

        let c = Config::from_vars(vars(&[("POSTHORN_KAFKA_SASL_PASSWORD", "kafka-secret")]))
            .expect("valid");
        assert_eq!(c.database.redacted(), "postgres://u:***@db:5432/app");
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("kafka-secret"), "{debug}");
    }

    #[test]
    fn kafka_variables_become_librdkafka_properties() {
        let c = Config::from_vars(vars(&[
            ("POSTHORN_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("POSTHORN_KAFKA_LINGER_MS", "20"),
        ]))
        .expect("valid");
        assert_eq!(c.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(c.kafka.properties["linger.ms"], "20");
        assert!(!c.kafka.properties.contains_key("brokers"));
        assert_eq!(
            kafka_property_var("security.protocol"),
            "POSTHORN_KAFKA_SECURITY_PROTOCOL"
        );
    }

    #[test]
    fn the_promise_properties_cannot_be_weakened() {
        let msg = Config::from_vars(vars(&[("POSTHORN_KAFKA_ENABLE_IDEMPOTENCE", "false")]))
            .expect_err("weakened")
            .to_string();
        assert!(
            msg.starts_with("POSTHORN_KAFKA_ENABLE_IDEMPOTENCE: must be true"),
            "{msg}"
        );
        assert!(Config::from_vars(vars(&[("POSTHORN_KAFKA_ACKS", "1")])).is_err());
        assert!(Config::from_vars(vars(&[("POSTHORN_KAFKA_ACKS", "-1")])).is_ok());
    }

    #[test]
    fn table_and_schema_must_be_plain_identifiers() {
        let msg = Config::from_vars(vars(&[("POSTHORN_TABLE", "out\"box")]))
            .expect_err("quote")
            .to_string();
        assert!(msg.starts_with("POSTHORN_TABLE: "), "{msg}");
        assert!(Config::from_vars(vars(&[("POSTHORN_SCHEMA", "Sales")])).is_err());
        let c = Config::from_vars(vars(&[
            ("POSTHORN_SCHEMA", "sales"),
            ("POSTHORN_TABLE", "order_events"),
        ]))
        .expect("valid");
        assert_eq!(c.outbox.channel(), "posthorn.sales.order_events");
    }

    #[test]
    fn topic_templates_render_and_reject_unknown_placeholders() {
        let t = TopicTemplate::parse("svc.{aggregate_type}.{event_type}", "V").expect("valid");
        assert_eq!(t.render("order", "shipped"), "svc.order.shipped");
        let msg = TopicTemplate::parse("{aggregate}", "POSTHORN_TOPIC_TEMPLATE")
            .expect_err("unknown")
            .to_string();
        assert!(msg.contains("unknown placeholder '{aggregate}'"), "{msg}");
        assert!(TopicTemplate::parse("a b", "V").is_err());
        assert!(TopicTemplate::parse("{aggregate_type", "V").is_err());
    }

    #[test]
    fn topic_names_are_checked_against_kafka_rules() {
        assert_eq!(topic_name_problem("orders.v1"), None);
        assert!(topic_name_problem("").is_some());
        assert!(topic_name_problem("..").is_some());
        assert!(topic_name_problem("has space").is_some());
        assert!(topic_name_problem(&"x".repeat(250)).is_some());
    }

    #[test]
    fn the_poison_policy_and_dead_letter_topic_are_validated() {
        let c = Config::from_vars(vars(&[])).expect("valid");
        assert_eq!(c.on_poison, PoisonPolicy::DeadLetter);
        assert_eq!(c.dead_letter_topic, None);
        let c = Config::from_vars(vars(&[("POSTHORN_DEAD_LETTER_TOPIC", "x.dlq")])).expect("ok");
        assert_eq!(c.dead_letter_topic.as_deref(), Some("x.dlq"));
        let msg = Config::from_vars(vars(&[("POSTHORN_ON_POISON", "skip")]))
            .expect_err("bad")
            .to_string();
        assert!(msg.starts_with("POSTHORN_ON_POISON: 'skip'"), "{msg}");
        assert!(Config::from_vars(vars(&[("POSTHORN_DEAD_LETTER_TOPIC", "a b")])).is_err());
        assert!(Config::from_vars(vars(&[
            ("POSTHORN_ON_POISON", "halt-key"),
            ("POSTHORN_DEAD_LETTER_TOPIC", "x.dlq")
        ]))
        .is_err());
    }

    #[test]
    fn the_lease_ttl_is_a_duration_within_bounds() {
        let c = Config::from_vars(vars(&[("POSTHORN_LEASE_TTL", "3s")])).expect("valid");
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        let c = Config::from_vars(vars(&[("POSTHORN_LEASE_TTL", "1m")])).expect("valid");
        assert_eq!(c.lease_ttl, Duration::from_secs(60));
        let msg = Config::from_vars(vars(&[("POSTHORN_LEASE_TTL", "500ms")]))
            .expect_err("too short")
            .to_string();
        assert!(msg.starts_with("POSTHORN_LEASE_TTL: '500ms'"), "{msg}");
        assert!(Config::from_vars(vars(&[("POSTHORN_LEASE_TTL", "ten")])).is_err());
    }

    #[test]
    fn unknown_posthorn_variables_are_reported_not_fatal() {
        let c = Config::from_vars(vars(&[("POSTHORN_BATCHSIZE", "10")])).expect("valid");
        assert_eq!(c.unknown_vars, vec!["POSTHORN_BATCHSIZE".to_owned()]);
    }

    #[test]
    fn exactly_once_needs_checkpoint_tracking_and_derives_its_topic() {
        let base = [
            ("POSTHORN_DATABASE_URL", "postgres://u:p@db/app"),
            ("POSTHORN_KAFKA_BROKERS", "k:9092"),
        ];
        let with = |extra: &[(&str, &str)]| {
            Config::from_vars(
                base.iter()
                    .chain(extra)
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
        };
        let c = with(&[]).expect("defaults");
        assert_eq!(c.delivery, Delivery::AtLeastOnce);
        assert_eq!(c.checkpoint_topic, "posthorn-checkpoint.public.outbox");
        assert_eq!(c.transactional_id, None);
        let err = with(&[("POSTHORN_DELIVERY", "exactly-once")]).expect_err("rows tracking");
        assert!(
            err.to_string().contains("POSTHORN_TRACKING=checkpoint"),
            "{err}"
        );
        let c = with(&[
            ("POSTHORN_DELIVERY", "exactly-once"),
            ("POSTHORN_TRACKING", "checkpoint"),
            ("POSTHORN_TABLE", "order_events"),
            ("POSTHORN_TRANSACTIONAL_ID", "orders-relay"),
        ])
        .expect("exactly once");
        assert_eq!(c.delivery, Delivery::ExactlyOnce);
        assert_eq!(
            c.checkpoint_topic,
            "posthorn-checkpoint.public.order_events"
        );
        assert_eq!(c.transactional_id.as_deref(), Some("orders-relay"));
        assert!(with(&[("POSTHORN_CHECKPOINT_TOPIC", "bad topic")]).is_err());
        assert!(with(&[("POSTHORN_KAFKA_TRANSACTIONAL_ID", "x")]).is_err());
        assert!(with(&[("POSTHORN_DELIVERY", "exactly-twice")]).is_err());
        assert_eq!(
            with(&[("POSTHORN_TEST_FAULT", "crash-after-commit:3")])
                .expect("a fault point")
                .test_fault,
            Some(TestFault::CrashAfterCommit(3))
        );
        assert!(with(&[("POSTHORN_TEST_FAULT", "crash:3")]).is_err());
    }
}
