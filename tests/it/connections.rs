//! The relay's Postgres connections: `TCP_NODELAY` is set on them (see
//! posthorn-writer/src/tcp_nodelay.rs).
//!
//! Each pool connects through a forwarder on a port of its own, so the sockets of this process
//! connected to that port are exactly that pool's, whatever else the test process has open and
//! wherever Postgres runs (a container behind a proxy included).

use posthorn::outbox::Outbox;
use posthorn::tcp_nodelay::for_each_socket_to;
use sqlx::postgres::PgPoolOptions;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{config, TestDb};

/// Forwards every connection made to the returned URL's port to the database of `url`.
async fn forwarder(url: &str) -> (String, u16) {
    let mut url = url::Url::parse(url).expect("database url");
    let target = format!(
        "{}:{}",
        url.host_str().expect("host"),
        url.port().unwrap_or(5432)
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    url.set_host(Some("127.0.0.1")).expect("host");
    url.set_port(Some(port)).expect("port");
    (url.to_string(), port)
}

/// `TCP_NODELAY` of each socket of this process connected to `port`.
fn nodelay_of_sockets_to(port: u16) -> Vec<bool> {
    let mut found = Vec::new();
    for_each_socket_to(port, |socket| {
        found.push(socket.tcp_nodelay().expect("TCP_NODELAY"))
    })
    .expect("/proc/self/fd");
    found
}

#[tokio::test]
async fn the_relays_postgres_connections_have_tcp_nodelay() {
    let db = TestDb::create("nodelay").await;

    let (relay_url, relay_port) = forwarder(&db.url).await;
    let outbox = Outbox::connect_lazy(&config(&relay_url, &[])).expect("pool");
    let background = Outbox::connect_lazy_background(
        &config(&relay_url, &[]).database,
        &config(&relay_url, &[]).outbox,
        posthorn::config::PoisonPolicy::DeadLetter,
    )
    .expect("pool");
    let _held = (
        outbox.pool().acquire().await.expect("relay connection"),
        background
            .pool()
            .acquire()
            .await
            .expect("background connection"),
    );
    assert_eq!(
        nodelay_of_sockets_to(relay_port),
        vec![true, true],
        "the relay's and the background pool's connection"
    );

    // The reason for posthorn-writer/src/tcp_nodelay.rs: sqlx 0.9.0 leaves Nagle on. When this
    // fails, sqlx sets TCP_NODELAY itself again and the module can go.
    let (plain_url, plain_port) = forwarder(&db.url).await;
    let plain = PgPoolOptions::new()
        .max_connections(1)
        .connect(&plain_url)
        .await
        .expect("plain sqlx pool");
    let _plain_held = plain.acquire().await.expect("plain connection");
    assert_eq!(nodelay_of_sockets_to(plain_port), vec![false]);
}
