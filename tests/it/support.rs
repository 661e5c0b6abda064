//! Shared test plumbing: real services, one database and topic per test, a real consumer.
//!
//! Services: `POSTHORN_TEST_DATABASE_URL` (an admin URL; each test creates its own database) and
//! `POSTHORN_TEST_KAFKA_BROKERS`, as `scripts/services.sh` exports them. When they are not set,
//! PostgreSQL and Kafka are started with testcontainers (needs a Docker engine).

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use posthorn::config::Config;
use posthorn::relay::{self, RelayStats};
use posthorn::shutdown::{Shutdown, ShutdownTrigger};
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::AssertSqlSafe;
use tokio::task::JoinHandle;

mod cluster;
pub use cluster::{KafkaCluster, Wipe};

pub struct Services {
    /// URL of a database the tests may create databases from.
    pub admin_url: String,
    pub brokers: String,
}

static SERVICES: OnceLock<Services> = OnceLock::new();

pub fn services() -> &'static Services {
    SERVICES.get_or_init(|| {
        match (
            std::env::var("POSTHORN_TEST_DATABASE_URL"),
            std::env::var("POSTHORN_TEST_KAFKA_BROKERS"),
        ) {
            (Ok(admin_url), Ok(brokers)) => Services { admin_url, brokers },
            // testcontainers' blocking runner starts its own runtime: keep it off ours.
            _ => std::thread::spawn(containers::start)
                .join()
                .expect("starting test containers"),
        }
    })
}

mod containers {
    use testcontainers::runners::SyncRunner;
    use testcontainers::Container;
    use testcontainers_modules::kafka::apache::{Kafka, KAFKA_PORT};
    use testcontainers_modules::postgres::Postgres;

    use super::Services;

    /// The containers live as long as the test process (they are never dropped).
    static KEEP: std::sync::OnceLock<(Container<Postgres>, Container<Kafka>)> =
        std::sync::OnceLock::new();

    pub fn start() -> Services {
        let pg = Postgres::default()
            .start()
            .expect("starting PostgreSQL (no POSTHORN_TEST_DATABASE_URL given; needs Docker)");
        let kafka = Kafka::default()
            .start()
            .expect("starting Kafka (no POSTHORN_TEST_KAFKA_BROKERS given; needs Docker)");
        let services = Services {
            admin_url: format!(
                "postgres://postgres:postgres@127.0.0.1:{}/postgres",
                pg.get_host_port_ipv4(5432).expect("postgres port")
            ),
            brokers: format!(
                "127.0.0.1:{}",
                kafka.get_host_port_ipv4(KAFKA_PORT).expect("kafka port")
            ),
        };
        let _ = KEEP.set((pg, kafka));
        services
    }
}

/// `<prefix>_<8 random hex digits>`: names no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::rng().random::<u32>())
}

/// A database of the test's own, migrated. It is left in place afterwards, for inspection.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn create(test: &str) -> TestDb {
        TestDb::create_with(test, &[]).await
    }

    /// `vars` are extra POSTHORN_* settings for the migration (schema, table).
    pub async fn create_with(test: &str, vars: &[(&str, &str)]) -> TestDb {
        TestDb::create_on(&services().admin_url, test, vars).await
    }

    /// A database on another server, given by its admin URL.
    pub async fn create_on(admin_url: &str, test: &str, vars: &[(&str, &str)]) -> TestDb {
        let url = create_database(admin_url, test).await;
        let config = config(&url, vars);
        posthorn::migrate::run(&config.database, &config.outbox)
            .await
            .expect("migrating the test database");
        TestDb::connect(url).await
    }

    /// A database of the test's own with no migration applied (for upgrade tests).
    pub async fn create_empty(test: &str) -> TestDb {
        let url = create_database(&services().admin_url, test).await;
        TestDb::connect(url).await
    }

    async fn connect(url: String) -> TestDb {
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&url)
            .await
            .expect("connecting to the test database");
        TestDb { url, pool }
    }

    /// Rows not yet delivered (failed rows among them), in either tracking mode.
    pub async fn undelivered(&self) -> i64 {
        let sql = format!("SELECT count(*) FROM outbox o WHERE NOT {DELIVERED}");
        sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .expect("counting undelivered rows")
    }

    /// Whether the row `id` is delivered, in either tracking mode.
    pub async fn is_delivered(&self, id: i64) -> bool {
        let sql = format!("SELECT {DELIVERED} FROM outbox o WHERE o.id = $1");
        sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .expect("the row's delivery")
    }

    /// Waits up to `within` until no row is undelivered; `what` names the wait if it times out.
    pub async fn wait_all_delivered(&self, within: Duration, what: &str) {
        wait_until(within, what, || async { self.undelivered().await == 0 }).await;
    }
}

/// Creates `posthorn_t_<test>_<random>` on the server of `admin_url`; returns its URL.
async fn create_database(admin_url: &str, test: &str) -> String {
    let name = unique(&format!("posthorn_t_{test}"));
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
        .expect("connecting to the admin database");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .expect("creating the test database");
    admin.close().await;
    with_database(admin_url, &name)
}

fn with_database(admin_url: &str, database: &str) -> String {
    let mut url = url::Url::parse(admin_url).expect("admin url");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

/// "Row `o` (an `outbox` row, aliased `o`) is delivered", in SQL, true in both tracking modes:
/// marked (rows mode; in checkpoint mode the rare row acknowledged out of order in an unclean
/// batch), or not failed and covered by the checkpoint (checkpoint mode; rows mode has no
/// checkpoint row). Never NULL, so `NOT` it is "not delivered".
pub const DELIVERED: &str = "(o.delivered_at IS NOT NULL \
     OR (o.failed_at IS NULL AND EXISTS ( \
           SELECT 1 FROM outbox_checkpoint c \
           WHERE pg_visible_in_snapshot(o.txid, c.snapshot) \
              OR (c.window_end IS NOT NULL AND pg_visible_in_snapshot(o.txid, c.window_end) \
                  AND o.id <= c.position))))";

/// `POSTHORN_TRACKING`: how the relay under test records what it has published. Tests of
/// delivery promises run in both modes (see `in_both_modes!`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// `delivered_at` on every row.
    Rows,
    /// Snapshot windows, one checkpoint row, no per-row `delivered_at`.
    Checkpoint,
}

impl Tracking {
    /// The setting, as an extra `POSTHORN_*` variable. Rows mode is given explicitly too, so a
    /// change of the default does not turn its tests into the other mode's.
    pub fn var(self) -> (&'static str, &'static str) {
        let value = match self {
            Tracking::Rows => "rows",
            Tracking::Checkpoint => "checkpoint",
        };
        ("POSTHORN_TRACKING", value)
    }

    /// [`config`] in this mode (a `POSTHORN_TRACKING` in `extra` wins).
    pub fn config(self, database_url: &str, extra: &[(&str, &str)]) -> Config {
        Config::from_vars(self.env_vars(database_url, extra)).expect("valid test configuration")
    }

    /// [`env_vars`] in this mode (a `POSTHORN_TRACKING` in `extra` wins).
    pub fn env_vars(self, database_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut with_mode = vec![self.var()];
        with_mode.extend_from_slice(extra);
        env_vars(database_url, &with_mode)
    }
}

/// `in_both_modes! { #[tokio::test(...)] name, ... }`, for `async fn name(tracking: Tracking)`
/// functions of the module it is in: two tests of each, `rows_mode::name` and
/// `checkpoint_mode::name`, calling it with its mode under the attributes given. A failure names
/// the mode, and `cargo test --test it delivery::checkpoint_mode::` runs one mode of one module.
/// (One invocation per module, listing its cases: macro_rules cannot make a `name_checkpoint`
/// identifier.) The functions stay plain code, which rustfmt formats.
macro_rules! in_both_modes {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        mod rows_mode {
            $(
                $(#[$attr])*
                async fn $name() {
                    super::$name($crate::support::Tracking::Rows).await
                }
            )*
        }

        mod checkpoint_mode {
            $(
                $(#[$attr])*
                async fn $name() {
                    super::$name($crate::support::Tracking::Checkpoint).await
                }
            )*
        }
    };
}
pub(crate) use in_both_modes;

/// The relay's configuration for a test database, with extra `POSTHORN_*` settings.
pub fn config(database_url: &str, extra: &[(&str, &str)]) -> Config {
    Config::from_vars(env_vars(database_url, extra)).expect("valid test configuration")
}

/// The `POSTHORN_*` variables for a test database (for the binary, or `Config::from_vars`).
pub fn env_vars(database_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = vec![
        ("POSTHORN_DATABASE_URL".to_owned(), database_url.to_owned()),
        (
            "POSTHORN_KAFKA_BROKERS".to_owned(),
            services().brokers.clone(),
        ),
        ("POSTHORN_POLL_INTERVAL_MS".to_owned(), "200".to_owned()),
        // One name per test: a relay restarted by the test takes its own lease over at once.
        ("POSTHORN_INSTANCE_ID".to_owned(), unique("it")),
        // Any free port: tests run relays side by side.
        ("POSTHORN_HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
    ];
    for (k, v) in extra {
        vars.retain(|(existing, _)| existing != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    vars
}

/// A relay running in this process.
pub struct RunningRelay {
    trigger: ShutdownTrigger,
    task: JoinHandle<Result<RelayStats, relay::RelayError>>,
}

impl RunningRelay {
    pub fn start(config: Config) -> RunningRelay {
        // In-process relays log to the test's output (shown for failing tests); RUST_LOG filters.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
        let (trigger, shutdown) = Shutdown::new();
        let task = tokio::spawn(async move { relay::run(&config, shutdown).await });
        RunningRelay { trigger, task }
    }

    pub async fn stop(self) -> RelayStats {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the relay stops within 30 s of its shutdown")
            .expect("the relay task does not panic")
            .expect("the relay returns Ok")
    }
}

/// The `posthorn` binary built for these tests.
pub fn posthorn_command(vars: &[(String, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_posthorn"));
    // Only the variables given: nothing from the developer's own environment leaks in.
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars.iter().cloned())
        .stdin(Stdio::null());
    cmd
}

/// A `posthorn run` child process; killed (SIGKILL) when dropped.
pub struct RelayProcess {
    pub child: Child,
    /// Where its stderr (the log) goes.
    pub log: PathBuf,
}

impl RelayProcess {
    pub fn spawn(vars: &[(String, String)], log: &std::path::Path) -> RelayProcess {
        let file = std::fs::File::create(log).expect("creating the relay log");
        let child = posthorn_command(vars)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("starting posthorn");
        RelayProcess {
            child,
            log: log.to_owned(),
        }
    }

    /// The address its HTTP endpoints listen on, from its log (text format), once it is there.
    pub async fn http_addr(&self) -> SocketAddr {
        let mut addr = None;
        wait_until(
            Duration::from_secs(30),
            "the relay logs its HTTP address",
            || {
                addr = std::fs::read_to_string(&self.log)
                    .ok()
                    .and_then(|log| http_addr_in_log(&log));
                std::future::ready(addr.is_some())
            },
        )
        .await;
        addr.expect("waited for it")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for posthorn") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "posthorn did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_addr_in_log(log: &str) -> Option<SocketAddr> {
    log.lines()
        .find(|line| line.contains("Serving /metrics, /healthz and /readyz."))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))?
        .parse()
        .ok()
}

/// A fresh path for a relay's log under the test target directory (kept for inspection).
pub fn relay_log_path(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("relay-logs");
    std::fs::create_dir_all(&dir).expect("log dir");
    dir.join(format!("{}.log", unique(name)))
}

/// Installs the Python packages pinned in `requirements` (a path relative to the repository):
/// about a second when they are already there (pip then does not go to the index).
pub fn pip_install(requirements: &str) {
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(requirements))
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .stdin(Stdio::null())
        .output()
        .expect("running python3 -m pip (is Python 3 with pip installed?)");
    assert!(
        out.status.success(),
        "pip install -r {requirements} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rows delivered, in either tracking mode (-1 when the database does not answer).
pub async fn delivered(db: &TestDb) -> i64 {
    let sql = format!("SELECT count(*) FROM outbox o WHERE {DELIVERED}");
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&db.pool)
        .await
        .unwrap_or(-1)
}

/// Runs the `posthorn` binary to completion: (exit status, stdout, stderr).
pub fn run_posthorn(args: &[&str], vars: &[(String, String)]) -> (i32, String, String) {
    let out = posthorn_command(vars)
        .args(args)
        .output()
        .expect("running posthorn");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// GET `http://addr/path`: (status, body). Any status is an answer, not an error.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut response = agent
            .get(&url)
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|e| panic!("reading {url}: {e}"));
        (status, body)
    })
    .await
    .expect("HTTP client thread")
}

/// One scrape of `/metrics`, parsed by a Prometheus text-format parser.
pub struct Scrape {
    pub parsed: prometheus_parse::Scrape,
    /// As served, for failure messages.
    pub text: String,
}

impl Scrape {
    pub async fn from(addr: SocketAddr) -> Scrape {
        let (status, text) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "/metrics answers 200: {text}");
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
        Scrape { parsed, text }
    }

    /// The value of a counter, gauge or untyped sample with exactly these labels.
    pub fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        use prometheus_parse::Value;
        self.parsed
            .samples
            .iter()
            .filter(|s| s.metric == metric && s.labels.len() == labels.len())
            .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .and_then(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    /// A histogram's observation count (its `+Inf` bucket).
    pub fn histogram_count(&self, metric: &str) -> Option<f64> {
        self.parsed
            .samples
            .iter()
            .find(|s| s.metric == metric)
            .and_then(|s| match &s.value {
                prometheus_parse::Value::Histogram(buckets) => buckets
                    .iter()
                    .find(|b| b.less_than.is_infinite())
                    .map(|b| b.count),
                _ => None,
            })
    }
}

/// Polls `condition` until it is true; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_at(&services().brokers, topic, partitions).await
}

pub async fn create_topic_at(brokers: &str, topic: &str, partitions: i32) {
    create_topic_replicated(brokers, topic, partitions, 1).await
}

/// A topic whose partitions have `replication` replicas each (3 on a [`KafkaCluster`] of three).
pub async fn create_topic_replicated(
    brokers: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(replication),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.expect("creating the topic");
    }
}

/// One record as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl Record {
    pub fn value_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().expect("a value")).expect("JSON value")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("record has no '{name}' header: {self:?}"))
    }
}

/// Reads `topic` with a real consumer from the beginning of every partition until at least
/// `at_least` records arrived AND every partition is read to its high watermark, so records
/// beyond the expected ones are seen too. Panics after `timeout`.
pub async fn read_topic(topic: &str, at_least: usize, timeout: Duration) -> Vec<Record> {
    read_topic_at(&services().brokers, topic, at_least, timeout).await
}

/// [`read_topic`] on another cluster (a private broker, rdkafka's MockCluster).
pub async fn read_topic_at(
    brokers: &str,
    topic: &str,
    at_least: usize,
    timeout: Duration,
) -> Vec<Record> {
    read_topic_isolated(brokers, topic, at_least, timeout, Isolation::ReadCommitted).await
}

/// A consumer's `isolation.level`: what it reads of Kafka transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Committed records only (librdkafka's default, and every reader's above).
    ReadCommitted,
    /// Every record written, aborted transactions' too.
    ReadUncommitted,
}

/// [`read_topic_at`] with the given isolation level. The end is each partition's high
/// watermark, reached by the consumer's position (which passes transaction markers).
pub async fn read_topic_isolated(
    brokers: &str,
    topic: &str,
    at_least: usize,
    timeout: Duration,
    isolation: Isolation,
) -> Vec<Record> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        read_topic_blocking(&brokers, &topic, at_least, timeout, isolation)
    })
    .await
    .expect("consumer thread")
}

fn read_topic_blocking(
    brokers: &str,
    topic: &str,
    at_least: usize,
    timeout: Duration,
    isolation: Isolation,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("posthorn-it-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set(
            "isolation.level",
            match isolation {
                Isolation::ReadCommitted => "read_committed",
                Isolation::ReadUncommitted => "read_uncommitted",
            },
        )
        .create()
        .expect("consumer");
    let deadline = Instant::now() + timeout;
    let metadata = loop {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .expect("topic metadata");
        let ready = md
            .topics()
            .first()
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        if ready {
            break md;
        }
        assert!(Instant::now() < deadline, "topic {topic} never appeared");
        std::thread::sleep(Duration::from_millis(100));
    };
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        assignment
            .add_partition_offset(topic, *p, Offset::Beginning)
            .expect("assignment");
    }
    consumer.assign(&assignment).expect("assign");

    let mut records = Vec::new();
    let mut ends: Option<HashMap<i32, i64>> = None;
    loop {
        if records.len() >= at_least && ends.is_none() {
            let mut e = HashMap::new();
            for p in &partitions {
                let (_, high) = consumer
                    .fetch_watermarks(topic, *p, Duration::from_secs(5))
                    .expect("watermarks");
                e.insert(*p, high);
            }
            ends = Some(e);
        }
        if let Some(ends) = &ends {
            // The position, not the last record's offset: a transaction's commit marker takes
            // an offset too, and no record is read at it.
            let positions: HashMap<i32, i64> = consumer
                .position()
                .expect("positions")
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(0).max(0)))
                .collect();
            let done = ends
                .iter()
                .all(|(p, high)| positions.get(p).copied().unwrap_or(0) >= *high);
            if done {
                return records;
            }
        }
        assert!(
            Instant::now() < deadline,
            "read {} of at least {at_least} records from {topic} in {timeout:?}",
            records.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.expect("consumer error");
        let mut headers = HashMap::new();
        if let Some(hs) = message.headers() {
            for h in hs.iter() {
                let value = h
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                headers.insert(h.key.to_owned(), value);
            }
        }
        records.push(Record {
            partition: message.partition(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
}

/// Each key's `version` values, in consumption order (one key lives in one partition, so this is
/// Kafka's order for that key).
pub fn versions_per_key(records: &[Record]) -> std::collections::BTreeMap<String, Vec<i64>> {
    let mut per_key: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for r in records {
        per_key
            .entry(r.key.clone().expect("key"))
            .or_default()
            .push(r.value_json()["version"].as_i64().expect("version"));
    }
    per_key
}

/// Asserts every key has every version 1..=n_per_key, new versions in order, repeats only of
/// versions already seen. Returns the number of repeats (duplicates).
pub fn assert_complete_and_ordered(records: &[Record], n_keys: usize, n_per_key: usize) -> usize {
    let per_key = versions_per_key(records);
    assert_eq!(per_key.len(), n_keys, "every key arrived");
    for (key, versions) in &per_key {
        let newest = versions.iter().max().copied().unwrap_or(0);
        assert_eq!(newest, n_per_key as i64, "key {key}: every version arrived");
    }
    let (distinct, duplicates) = assert_each_key_gapless_and_ordered(records);
    assert_eq!(distinct, n_keys * n_per_key);
    duplicates
}

/// Asserts each key's versions are 1..=newest with no gap, new versions in order, repeats only
/// of versions already seen. Returns (distinct records, repeats).
pub fn assert_each_key_gapless_and_ordered(records: &[Record]) -> (usize, usize) {
    let (mut distinct, mut duplicates) = (0, 0);
    for (key, versions) in &versions_per_key(records) {
        duplicates += check_key_order(versions).unwrap_or_else(|e| panic!("key {key}: {e}"));
        let unique: std::collections::HashSet<i64> = versions.iter().copied().collect();
        let newest = versions.iter().max().copied().unwrap_or(0);
        assert_eq!(unique.len() as i64, newest, "key {key}: no version missing");
        distinct += unique.len();
    }
    assert_eq!(records.len(), distinct + duplicates);
    (distinct, duplicates)
}

/// Writes `n_events` versioned events over `keys` from `n_writers` concurrent writers; returns
/// when all are committed.
pub fn spawn_writers(
    pool: &PgPool,
    aggregate_type: &str,
    keys: &[String],
    n_events: usize,
    n_writers: usize,
) -> tokio::task::JoinHandle<()> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..n_writers)
        .map(|w| {
            let (pool, next, keys, aggregate_type) = (
                pool.clone(),
                next.clone(),
                keys.to_vec(),
                aggregate_type.to_owned(),
            );
            tokio::spawn(async move {
                loop {
                    let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if j >= n_events {
                        break;
                    }
                    write_versioned_event(&pool, &aggregate_type, &keys[j % keys.len()], w).await;
                }
            })
        })
        .collect();
    tokio::spawn(async move {
        for t in tasks {
            t.await.expect("writer");
        }
    })
}

/// Checks a key's sequence of versions as consumed: every new version arrives in order
/// (max seen + 1), and anything else is a repeat of a version already seen (a redelivered
/// suffix after a crash). Returns the number of repeats, or the first violation.
pub fn check_key_order(versions: &[i64]) -> Result<usize, String> {
    let mut max_seen = 0;
    let mut repeats = 0;
    for (i, &v) in versions.iter().enumerate() {
        if v == max_seen + 1 {
            max_seen = v;
        } else if v >= 1 && v <= max_seen {
            repeats += 1;
        } else {
            return Err(format!(
                "position {i}: version {v} arrived when the newest was {max_seen} (sequence {versions:?})"
            ));
        }
    }
    Ok(repeats)
}

/// One event on aggregate `aggregate_id` in its own transaction, serialized per aggregate the
/// way a service would: lock the aggregate row, bump its version, write the outbox row.
pub async fn write_versioned_event(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    writer: usize,
) -> i64 {
    let mut tx = pool.begin().await.expect("begin");
    let version = insert_versioned_event(&mut tx, aggregate_type, aggregate_id, writer).await;
    tx.commit().await.expect("commit");
    version
}

/// [`write_versioned_event`]'s statements inside the caller's transaction (which then holds
/// the aggregate's lock until it ends); returns the version.
pub async fn insert_versioned_event(
    conn: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
    writer: usize,
) -> i64 {
    let current: i32 =
        sqlx::query_scalar("SELECT version FROM aggregates WHERE id = $1 FOR UPDATE")
            .bind(aggregate_id)
            .fetch_one(&mut *conn)
            .await
            .expect("lock the aggregate");
    let version = current + 1;
    sqlx::query("UPDATE aggregates SET version = $2 WHERE id = $1")
        .bind(aggregate_id)
        .bind(version)
        .execute(&mut *conn)
        .await
        .expect("bump the aggregate's version");
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
         VALUES ($1, $2, 'Incremented', jsonb_build_object('version', $3::int), \
                 jsonb_build_object('writer', $4::text))",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(version)
    .bind(format!("w{writer}"))
    .execute(&mut *conn)
    .await
    .expect("insert the outbox row");
    i64::from(version)
}

pub async fn create_aggregates(pool: &PgPool, ids: &[String]) {
    sqlx::query("CREATE TABLE aggregates (id text PRIMARY KEY, version int NOT NULL DEFAULT 0)")
        .execute(pool)
        .await
        .expect("create aggregates");
    sqlx::query("INSERT INTO aggregates (id) SELECT unnest($1::text[])")
        .bind(ids)
        .execute(pool)
        .await
        .expect("insert aggregates");
}
