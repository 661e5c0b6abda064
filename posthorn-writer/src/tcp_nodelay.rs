//! `TCP_NODELAY` on Postgres connections, which sqlx 0.9.0 no longer sets.
//!
//! sqlx set `TCP_NODELAY` from 2024 (#3055) and dropped it in 0.9.0 (transact-rs/sqlx#4335;
//! the fix, #4336, is merged but not released). Without it, Nagle's algorithm holds back the last
//! segment of a statement the client sends in more than one write until the server has
//! acknowledged the ones before, and the server delays that acknowledgement by 40 ms. With TLS
//! (sqlx's default `sslmode=prefer`) every 16 KiB is a record of its own. The relay's mark of a
//! batch over ~1,300 rows waited 40 ms each time (batches of 2,000 drained at 33k rows/s
//! instead of 82k), and so does a large [`enqueue_batch`](crate::enqueue_batch). libpq and most
//! other clients always set `TCP_NODELAY`.
//!
//! sqlx gives no access to its socket, so [`pool_options`] adds an `after_connect` hook that
//! sets the option on every TCP socket of this process whose peer port is the server's; after
//! connecting a single connection yourself, call [`set_on_connections_to`]. Only Postgres
//! connections go to that port, and setting it on one made by another pool is what that pool
//! needs too. Linux only (it reads /proc/self/fd); elsewhere it does nothing. The relay uses it
//! for its own pools. Drop it once sqlx sets the option again.
//!
//! ```no_run
//! # async fn f() -> Result<(), sqlx::Error> {
//! let options: sqlx::postgres::PgConnectOptions = "postgres://app@db/app".parse()?;
//! let pool = posthorn_writer::tcp_nodelay::pool_options(&options)
//!     .max_connections(10)
//!     .connect_with(options)
//!     .await?;
//! # Ok(()) }
//! ```

use socket2::SockRef;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Pool options whose connections get `TCP_NODELAY` when they connect over TCP.
pub fn pool_options(options: &PgConnectOptions) -> PgPoolOptions {
    let port = match options.get_socket() {
        Some(_) => None, // a Unix socket: no Nagle
        None => Some(options.get_port()),
    };
    PgPoolOptions::new().after_connect(move |_conn, _meta| {
        Box::pin(async move {
            if let Some(port) = port {
                // No /proc (not Linux): the connection works as sqlx made it.
                let _ = set_on_connections_to(port);
            }
            Ok(())
        })
    })
}

/// Sets `TCP_NODELAY` on every connected TCP socket of this process whose peer port is
/// `port` (the Postgres server's) and which lacks it. Returns how many it changed.
pub fn set_on_connections_to(port: u16) -> std::io::Result<usize> {
    let mut changed = 0;
    for_each_socket_to(port, |socket| {
        if socket.tcp_nodelay().is_ok_and(|on| !on) && socket.set_tcp_nodelay(true).is_ok() {
            changed += 1;
        }
    })?;
    Ok(changed)
}

/// Calls `f` with each connected TCP socket of this process whose peer port is `port`. Linux
/// only (reads /proc/self/fd); elsewhere an `Unsupported` error.
#[cfg(not(target_os = "linux"))]
pub fn for_each_socket_to(_port: u16, _f: impl FnMut(SockRef<'_>)) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "finding this process's sockets reads /proc/self/fd: Linux only",
    ))
}

/// Calls `f` with each connected TCP socket of this process whose peer port is `port`. Linux
/// only (reads /proc/self/fd); elsewhere an `Unsupported` error.
#[cfg(target_os = "linux")]
pub fn for_each_socket_to(port: u16, mut f: impl FnMut(SockRef<'_>)) -> std::io::Result<()> {
    use socket2::Type;
    use std::os::fd::{BorrowedFd, RawFd};

    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is borrowed for a few socket calls and never closed here
        // (SockRef does not close). Another thread may close it meanwhile; the calls then fail
        // with EBADF, or reach a new descriptor with the same number, which is used only if it
        // too is a TCP socket connected to `port`. Neither touches memory.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd);
        let is_match = socket.r#type().is_ok_and(|t| t == Type::STREAM)
            && socket
                .peer_addr()
                .ok()
                .and_then(|addr| addr.as_socket())
                .is_some_and(|addr| addr.port() == port);
        if is_match {
            f(socket);
        }
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn sets_nodelay_only_on_sockets_connected_to_the_port() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let other = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let to_port = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let to_other = TcpStream::connect(other.local_addr().expect("addr")).expect("connect");
        assert!(!to_port.nodelay().expect("nodelay"));

        let changed = set_on_connections_to(port).expect("scan");

        assert_eq!(changed, 1);
        assert!(to_port.nodelay().expect("nodelay"));
        assert!(
            !to_other.nodelay().expect("nodelay"),
            "another port's socket"
        );
        assert_eq!(set_on_connections_to(port).expect("scan"), 0, "already set");
    }
}
