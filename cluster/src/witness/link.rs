//! The witness link: raft traffic between the three voters over QUIC with
//! mutual TLS (the cluster CA; each side's certificate name checked), as a
//! `DatagramSocket` so the raft driver does not know the difference.
//!
//! A message travels as one QUIC datagram when it fits the path, else on a
//! unidirectional stream of its own (raft snapshots with many RGs). A side
//! dials the addresses it is given (nodes dial the witness and each other)
//! and answers on whatever connection a message came in on (the witness
//! dials no one). Sending never waits for a handshake: while a connection
//! is being set up its messages are dropped (counted) and raft resends.

use crate::election::driver::{DatagramSocket, IoFuture};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Largest message read from a stream.
const MAX_MESSAGE: usize = 64 * 1024;
/// Received messages waiting for the raft driver; beyond it they are
/// dropped (counted): raft resends.
const INBOX: usize = 1024;

/// Counters of the link.
#[derive(Default, Debug)]
pub struct LinkStats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Dropped: no connection yet (dial under way) or the inbox full.
    pub dropped_no_connection: AtomicU64,
    pub dropped_inbox_full: AtomicU64,
    /// Connections refused: the peer's certificate is not one we accept.
    pub refused_peers: AtomicU64,
}

struct Inner {
    endpoint: quinn::Endpoint,
    client: Option<quinn::ClientConfig>,
    /// Who this side dials, and the name their certificate must carry.
    dial: HashMap<SocketAddr, String>,
    /// Names accepted from incoming connections.
    accept: Vec<String>,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    dialing: Mutex<HashSet<SocketAddr>>,
    tx: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    stats: Arc<LinkStats>,
}

/// One voter's side of the witness link.
pub struct QuicLink {
    inner: Arc<Inner>,
    rx: tokio::sync::Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
}

impl QuicLink {
    /// `endpoint` must have a server config when `accept` is not empty;
    /// `client` is needed when `dial` is not empty.
    pub fn new(
        endpoint: quinn::Endpoint,
        client: Option<quinn::ClientConfig>,
        dial: Vec<(SocketAddr, String)>,
        accept: Vec<String>,
    ) -> QuicLink {
        let (tx, rx) = mpsc::channel(INBOX);
        let inner = Arc::new(Inner {
            endpoint,
            client,
            dial: dial.into_iter().collect(),
            accept,
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashSet::new()),
            tx,
            stats: Arc::default(),
        });
        if !inner.accept.is_empty() {
            tokio::spawn(accept_loop(inner.clone()));
        }
        QuicLink {
            inner,
            rx: tokio::sync::Mutex::new(rx),
        }
    }

    pub fn stats(&self) -> Arc<LinkStats> {
        self.inner.stats.clone()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "witness link: handshake failed");
                    return;
                }
            };
            let ok = inner
                .accept
                .iter()
                .any(|n| crate::tls::verify_peer_name(&conn, n).is_ok());
            if !ok {
                inner.stats.refused_peers.fetch_add(1, Ordering::Relaxed);
                warn!(peer = %conn.remote_address(), "witness link: certificate of a party we do not accept");
                conn.close(1u32.into(), b"unexpected peer");
                return;
            }
            serve_conn(inner, conn).await;
        });
    }
}

/// Registers `conn` and reads its messages until it closes.
async fn serve_conn(inner: Arc<Inner>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    inner
        .conns
        .lock()
        .expect("conns")
        .insert(remote, conn.clone());
    loop {
        let msg = tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(b) => b.to_vec(),
                Err(_) => break,
            },
            s = conn.accept_uni() => match s {
                Ok(mut s) => match s.read_to_end(MAX_MESSAGE).await {
                    Ok(b) => b,
                    Err(_) => continue,
                },
                Err(_) => break,
            },
        };
        inner.stats.received.fetch_add(1, Ordering::Relaxed);
        if inner.tx.try_send((msg, remote)).is_err() {
            inner
                .stats
                .dropped_inbox_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut conns = inner.conns.lock().expect("conns");
    if conns
        .get(&remote)
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        conns.remove(&remote);
    }
}

fn dial(inner: Arc<Inner>, to: SocketAddr) {
    let (Some(client), Some(name)) = (inner.client.clone(), inner.dial.get(&to).cloned()) else {
        return;
    };
    if !inner.dialing.lock().expect("dialing").insert(to) {
        return;
    }
    tokio::spawn(async move {
        let conn = match inner.endpoint.connect_with(client, to, &name) {
            Ok(c) => c.await,
            Err(e) => {
                debug!(%to, error = %e, "witness link: cannot dial");
                inner.dialing.lock().expect("dialing").remove(&to);
                return;
            }
        };
        inner.dialing.lock().expect("dialing").remove(&to);
        match conn {
            Ok(c) => serve_conn(inner, c).await,
            Err(e) => debug!(%to, error = %e, "witness link: handshake failed"),
        }
    });
}

impl DatagramSocket for QuicLink {
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> IoFuture<'a, usize> {
        let inner = &self.inner;
        let conn = inner
            .conns
            .lock()
            .expect("conns")
            .get(&to)
            .filter(|c| c.close_reason().is_none())
            .cloned();
        match conn {
            Some(c) => {
                inner.stats.sent.fetch_add(1, Ordering::Relaxed);
                let fits = c.max_datagram_size().is_some_and(|m| buf.len() <= m);
                let bytes = Bytes::copy_from_slice(buf);
                if !fits || c.send_datagram(bytes.clone()).is_err() {
                    tokio::spawn(async move {
                        if let Ok(mut s) = c.open_uni().await {
                            let _ = s.write_all(&bytes).await;
                            let _ = s.finish();
                        }
                    });
                }
            }
            None => {
                inner
                    .stats
                    .dropped_no_connection
                    .fetch_add(1, Ordering::Relaxed);
                dial(inner.clone(), to);
            }
        }
        let n = buf.len();
        Box::pin(async move { Ok(n) })
    }

    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> IoFuture<'a, (usize, SocketAddr)> {
        Box::pin(async move {
            let (msg, from) = self.rx.lock().await.recv().await.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "witness link closed")
            })?;
            let n = msg.len().min(buf.len());
            buf[..n].copy_from_slice(&msg[..n]);
            Ok((n, from))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn endpoint(id: &tls::TlsIdentity) -> quinn::Endpoint {
        let sc = tls::server_config(id, Duration::from_secs(3)).unwrap();
        quinn::Endpoint::server(sc, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap()
    }

    async fn first_message(link: &QuicLink) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = [0u8; 2048];
        let r = tokio::time::timeout(Duration::from_secs(3), link.recv_from(&mut buf)).await;
        r.ok()?.ok().map(|(n, from)| (buf[..n].to_vec(), from))
    }

    /// Sends until the dial has completed and one message went through.
    async fn send_until_connected(link: &QuicLink, to: SocketAddr, msg: &[u8]) {
        for _ in 0..100 {
            link.send_to(msg, to).await.unwrap();
            if link.stats().sent.load(Ordering::Relaxed) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn witness_link_takes_the_nodes_and_refuses_other_certificates() {
        let pki = tls::generate_pki("t", &["node0", "node7", "witness"]).unwrap();
        let id = |n: &str| tls::identity_from_generated(&pki, n, "witness").unwrap();
        let witness = QuicLink::new(endpoint(&id("witness")), None, vec![], vec!["node0".into()]);
        let waddr = witness.local_addr().unwrap();
        let client = |n: &str| {
            let cc = tls::client_config(&id(n), Duration::from_secs(3)).unwrap();
            QuicLink::new(
                endpoint(&id(n)),
                Some(cc),
                vec![(waddr, "witness".into())],
                vec![],
            )
        };
        let node0 = client("node0");
        send_until_connected(&node0, waddr, b"raft from node0").await;
        let (msg, from) = first_message(&witness).await.expect("delivered");
        assert_eq!(msg, b"raft from node0");
        assert_eq!(from, node0.local_addr().unwrap());
        // The witness answers on the connection the message came in on.
        witness.send_to(b"reply", from).await.unwrap();
        assert_eq!(first_message(&node0).await.unwrap().0, b"reply");
        // A large message (a snapshot) takes a stream.
        let big = vec![7u8; 8000];
        witness.send_to(&big, from).await.unwrap();
        let mut buf = vec![0u8; 16_000];
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), node0.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], &big[..]);

        // Certified by the same CA, but not a name the witness accepts.
        let intruder = client("node7");
        for _ in 0..20 {
            intruder.send_to(b"raft from node7", waddr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(witness.stats().refused_peers.load(Ordering::Relaxed) >= 1);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), witness.recv_from(&mut buf))
                .await
                .is_err(),
            "nothing from the intruder reached the raft member"
        );
    }
}
