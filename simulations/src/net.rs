//! quinn and the cluster's datagram sockets on turmoil's simulated UDP,
//! with every send passing a per-path, per-direction link switch the
//! scenario controls (turmoil partitions whole hosts; the cluster needs the
//! control link cut while the fabric links stay up).

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, UdpPoller};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;
use tandem_cluster::election::Path;
use tandem_cluster::election::driver::{DatagramSocket, IoFuture};

/// Which (path, from-node, to-node) directions are up. Node ids 0, 1; the
/// witness is 2.
#[derive(Debug, Default)]
pub struct Links {
    down: Mutex<std::collections::BTreeSet<(u8, u8, u8)>>,
}

impl Links {
    pub fn set(&self, path: Path, from: u8, to: u8, up: bool) {
        let mut d = self.down.lock().expect("links");
        if up {
            d.remove(&(path as u8, from, to));
        } else {
            d.insert((path as u8, from, to));
        }
    }

    /// Both directions.
    pub fn set_both(&self, path: Path, a: u8, b: u8, up: bool) {
        self.set(path, a, b, up);
        self.set(path, b, a, up);
    }

    pub fn is_up(&self, path: Path, from: u8, to: u8) -> bool {
        !self
            .down
            .lock()
            .expect("links")
            .contains(&(path as u8, from, to))
    }

    pub fn heal(&self) {
        self.down.lock().expect("links").clear();
    }
}

/// Maps a destination address to the node id behind it.
pub type Resolver = Arc<dyn Fn(SocketAddr) -> Option<u8> + Send + Sync>;

type ReadableFut = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// turmoil UDP as quinn's socket, sends filtered by the links.
pub struct SimUdp {
    sock: Arc<turmoil::net::UdpSocket>,
    readable: Mutex<Option<ReadableFut>>,
    links: Arc<Links>,
    path: Path,
    me: u8,
    resolve: Resolver,
}

impl fmt::Debug for SimUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimUdp")
            .field("path", &self.path)
            .field("me", &self.me)
            .finish()
    }
}

impl SimUdp {
    pub fn new(
        sock: turmoil::net::UdpSocket,
        links: Arc<Links>,
        path: Path,
        me: u8,
        resolve: Resolver,
    ) -> SimUdp {
        SimUdp {
            sock: Arc::new(sock),
            readable: Mutex::new(None),
            links,
            path,
            me,
            resolve,
        }
    }

    fn allowed(&self, to: SocketAddr) -> bool {
        (self.resolve)(to).is_none_or(|peer| self.links.is_up(self.path, self.me, peer))
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        if !self.allowed(t.destination) {
            return Ok(()); // lost on a cut link
        }
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for c in t.contents.chunks(seg) {
            // A full simulated queue is a loss, like on a real link.
            let _ = self.sock.try_send_to(c, t.destination);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut n = 0;
        loop {
            while n < bufs.len().min(meta.len()) {
                match self.sock.try_recv_from(&mut bufs[n]) {
                    Ok((len, addr)) => {
                        meta[n] = RecvMeta {
                            addr,
                            len,
                            stride: len,
                            ecn: None,
                            dst_ip: None,
                        };
                        n += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            let mut slot = self.readable.lock().expect("readable");
            let fut = slot.get_or_insert_with(|| {
                let s = self.sock.clone();
                Box::pin(async move { s.readable().await })
            });
            match fut.as_mut().poll(cx) {
                Poll::Ready(r) => {
                    *slot = None;
                    r?;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// quinn's runtime on the simulated clock.
#[derive(Debug)]
pub struct SimRuntime;

#[derive(Debug)]
struct SimTimer(Pin<Box<tokio::time::Sleep>>);

impl AsyncTimer for SimTimer {
    fn reset(mut self: Pin<&mut Self>, i: Instant) {
        self.0.as_mut().reset(i.into())
    }
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        Future::poll(self.0.as_mut(), cx)
    }
}

impl Runtime for SimRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(SimTimer(Box::pin(tokio::time::sleep_until(i.into()))))
    }
    fn spawn(&self, f: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(f);
    }
    fn wrap_udp_socket(&self, _: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Err(io::Error::other("the simulation provides its own sockets"))
    }
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// Fabric heartbeats and witness leases on turmoil UDP, filtered the same
/// way.
pub struct SimDatagram {
    inner: SimUdp,
}

impl SimDatagram {
    pub fn new(
        sock: turmoil::net::UdpSocket,
        links: Arc<Links>,
        path: Path,
        me: u8,
        resolve: Resolver,
    ) -> SimDatagram {
        SimDatagram {
            inner: SimUdp::new(sock, links, path, me, resolve),
        }
    }
}

impl DatagramSocket for SimDatagram {
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> IoFuture<'a, usize> {
        Box::pin(async move {
            if !self.inner.allowed(to) {
                return Ok(buf.len());
            }
            let _ = self.inner.sock.try_send_to(buf, to);
            Ok(buf.len())
        })
    }

    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> IoFuture<'a, (usize, SocketAddr)> {
        Box::pin(async move { self.inner.sock.recv_from(buf).await })
    }
}
