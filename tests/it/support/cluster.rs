//! Apache Kafka clusters of a test's own: one node or three, on free loopback ports, started
//! with `scripts/kafka-node.sh` (the script `scripts/services.sh` starts the shared broker
//! with), so a test may kill, restart and wipe brokers without disturbing other tests.
//!
//! Needs `POSTHORN_TEST_KAFKA_HOME` (the jars `scripts/services.sh` fetched; `services.sh env`
//! prints it) and Java 17+. The nodes' directories are removed when the cluster is dropped,
//! unless the test failed: then they stay for inspection (the path is printed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, unique, wait_until};

/// What [`KafkaCluster::wipe`] removes from a stopped node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wipe {
    /// The partitions' data (a broker's lost disk); its controller keeps the metadata log.
    Data,
    /// Everything: with one node, the cluster comes back as new (no topics, no producer
    /// state). Only for a cluster of one: a controller that forgets its Raft log may not
    /// rejoin a quorum.
    Everything,
}

pub struct KafkaCluster {
    nodes: Vec<Node>,
    cluster_id: String,
    voters: String,
    root: PathBuf,
}

struct Node {
    id: usize,
    broker_port: u16,
    controller_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl KafkaCluster {
    /// Starts `n_nodes` combined broker+controller nodes (1, or 3 for replication factor 3 and
    /// `min.insync.replicas=2`) and waits until a metadata request lists every broker.
    pub async fn start(n_nodes: usize) -> KafkaCluster {
        let root = std::env::temp_dir().join(unique("posthorn-kafka"));
        let nodes: Vec<Node> = (1..=n_nodes)
            .map(|id| Node {
                id,
                broker_port: free_port(),
                controller_port: free_port(),
                dir: root.join(format!("node-{id}")),
                child: None,
            })
            .collect();
        let voters = nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = random_cluster_id();
        let mut cluster = KafkaCluster {
            nodes,
            cluster_id,
            voters,
            root,
        };
        for i in 0..n_nodes {
            cluster.spawn(i);
        }
        for i in 0..n_nodes {
            cluster.wait_ready(i, n_nodes).await;
        }
        cluster
    }

    /// Every broker's `host:port`, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.broker_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The broker id (`node.id`) of node `i` (0-based index).
    pub fn broker_id(&self, i: usize) -> i32 {
        self.nodes[i].id as i32
    }

    /// The index of the node whose broker id is `broker_id`.
    pub fn index_of(&self, broker_id: i32) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id as i32 == broker_id)
            .unwrap_or_else(|| panic!("no node has broker id {broker_id}"))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// SIGKILLs node `i` and waits for it to exit: a crash, nothing flushed.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Removes a killed node's data (see [`Wipe`]).
    pub fn wipe(&mut self, i: usize, what: Wipe) {
        let node = &self.nodes[i];
        assert!(node.child.is_none(), "wipe a node after killing it");
        assert!(
            what == Wipe::Data || self.nodes.len() == 1,
            "Wipe::Everything is for a cluster of one"
        );
        let remove = |p: PathBuf| {
            if p.exists() {
                std::fs::remove_dir_all(&p).unwrap_or_else(|e| panic!("removing {p:?}: {e}"));
            }
        };
        remove(self.data_dir(i));
        if what == Wipe::Everything {
            remove(node.dir.join("meta"));
        }
    }

    /// Starts node `i` again (after [`kill`](Self::kill), with what is left on its disk) and
    /// waits until it answers a metadata request listing every broker of the cluster.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ready(i, self.nodes.len()).await;
    }

    /// Starts several killed nodes at once, then waits for each: with three nodes, two down
    /// have taken the controller quorum with them, and a node brought back alone may not list
    /// every broker until the last one is back too.
    pub async fn restart_all(&mut self, nodes: &[usize]) {
        for &i in nodes {
            self.kill(i);
            self.spawn(i);
        }
        for &i in nodes {
            self.wait_ready(i, self.nodes.len()).await;
        }
    }

    /// Node `i`'s partition data (`log.dirs`): `<topic>-<partition>/*.log`.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("data")
    }

    /// Node `i`'s broker log, for failure messages.
    pub fn server_log(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("server.log")
    }

    fn spawn(&mut self, i: usize) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-node.sh");
        let node = &mut self.nodes[i];
        std::fs::create_dir_all(&node.dir).expect("the node's directory");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("stdout.log"))
            .expect("the node's stdout log");
        let child = Command::new("bash")
            .arg(&script)
            .arg(&node.dir)
            .arg(node.id.to_string())
            .arg(node.broker_port.to_string())
            .arg(node.controller_port.to_string())
            .arg(&self.voters)
            .arg(&self.cluster_id)
            .env("POSTHORN_KAFKA_HEAP", "384m")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {script:?}: {e}"));
        node.child = Some(child);
    }

    async fn wait_ready(&mut self, i: usize, n_brokers: usize) {
        let addr = format!("127.0.0.1:{}", self.nodes[i].broker_port);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-ready.py");
        let what = format!("Kafka node {} ({addr}) lists {n_brokers} brokers", i + 1);
        let dir = self.nodes[i].dir.clone();
        let node = &mut self.nodes[i];
        wait_until(Duration::from_secs(120), &what, || {
            if let Some(Ok(Some(status))) = node.child.as_mut().map(|c| c.try_wait()) {
                panic!("Kafka node exited with {status}; see {dir:?}/server.log and stdout.log");
            }
            let ready = Command::new("python3")
                .arg(&script)
                .arg(&addr)
                .arg(n_brokers.to_string())
                .arg("1")
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            std::future::ready(ready)
        })
        .await;
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!("the Kafka cluster's directories are kept: {:?}", self.root);
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// A cluster id as `kafka-storage random-uuid` makes one: 16 random bytes, base64url without
/// padding, never starting with `-` (Kafka's `Uuid.randomUuid` draws again for those: a leading
/// dash reads as an option on a command line; one made `format -t -...` fail here).
fn random_cluster_id() -> String {
    use base64::Engine;
    loop {
        let id =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
        if !id.starts_with('-') {
            return id;
        }
    }
}
