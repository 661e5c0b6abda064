//! The contracts as clients posthorn did not write see them, in another language: Python
//! writers on psycopg (libpq) and a pure-Python Kafka consumer (kafka-python, its own
//! implementation of the protocol, not librdkafka), against the real `posthorn` binary. The
//! checks themselves are in `tests/cross_client/check.py`; this runs it and wants it to pass.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    create_topic, in_both_modes, services, unique, RelayProcess, TestDb, Tracking,
};

/// The whole Python run: writing, consuming (its own deadline is 120 s) and the final marks.
const CHECK_TIMEOUT: Duration = Duration::from_secs(300);

fn cross_client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cross_client")
}

fn out_path(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cross-client");
    std::fs::create_dir_all(&dir).expect("output dir");
    dir.join(unique(name))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

fn install_python_deps() {
    crate::support::pip_install("tests/cross_client/requirements.txt");
}

/// Runs check.py with `vars`; returns its status, stdout and stderr. Killed after `timeout`.
async fn run_check(vars: &[(&str, &str)], timeout: Duration) -> (ExitStatus, String, String) {
    let (stdout_path, stderr_path) = (out_path("check.out"), out_path("check.err"));
    let mut child = Command::new("python3")
        .arg(cross_client_dir().join("check.py"))
        .envs(vars.iter().copied())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("starting python3 tests/cross_client/check.py");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for check.py") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "check.py did not finish within {timeout:?}; its output so far:\n{}\n{}",
                read(&stdout_path),
                read(&stderr_path)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (status, read(&stdout_path), read(&stderr_path))
}

in_both_modes! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    python_writers_and_a_pure_python_consumer_see_the_contract,
}

async fn python_writers_and_a_pure_python_consumer_see_the_contract(tracking: Tracking) {
    check_with(tracking, &[], "read_uncommitted").await
}

/// Exactly-once delivery read by a consumer posthorn did not write: kafka-python, with
/// `isolation_level=read_committed`, reads past the transaction markers and sees every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_read_by_a_pure_python_read_committed_consumer() {
    let checkpoint_topic = unique("it-cross-client-checkpoint");
    check_with(
        Tracking::Checkpoint,
        &[
            ("POSTHORN_DELIVERY", "exactly-once"),
            ("POSTHORN_CHECKPOINT_TOPIC", &checkpoint_topic),
        ],
        "read_committed",
    )
    .await
}

async fn check_with(tracking: Tracking, relay_vars: &[(&str, &str)], isolation: &str) {
    let db = TestDb::create("cross_client").await;
    let topic = unique("it-cross-client");
    create_topic(&topic, 3).await;
    install_python_deps();

    let log = out_path("relay.log");
    let mut relay = RelayProcess::spawn(&tracking.env_vars(&db.url, relay_vars), &log);
    let brokers = services().brokers.clone();
    let (status, stdout, stderr) = run_check(
        &[
            ("CHECK_DATABASE_URL", &db.url),
            ("CHECK_KAFKA_BROKERS", &brokers),
            ("CHECK_TOPIC", &topic),
            ("CHECK_N", "2000"),
            ("CHECK_ISOLATION", isolation),
        ],
        CHECK_TIMEOUT,
    )
    .await;
    println!("{stdout}");
    assert!(
        status.success(),
        "check.py failed ({status}); its output is above.\n--- stderr\n{stderr}\n--- relay log\n{}",
        read(&log)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("cross-client: ") && last.ends_with(" passed, 0 failed"),
        "check.py exited 0 but its last line is {last:?}:\n{stdout}\n{stderr}"
    );

    relay.signal("TERM");
    let status = relay.wait(Duration::from_secs(30)).await;
    let log = read(&log);
    assert!(
        status.success(),
        "SIGTERM exits with status 0, got {status}:\n{log}"
    );
    assert!(log.contains("Relay stopped."), "{log}");
    assert_eq!(db.undelivered().await, 0, "every row stays delivered");
}
