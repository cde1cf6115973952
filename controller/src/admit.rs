//! Admission of HTTPS connections, before TLS and HTTP: at most
//! `max_connections` open at once, and at most `max_connections_per_source`
//! from one source (an IPv4 address, or an IPv6 /64, which one machine
//! usually holds whole). A connection over its source's cap is closed at
//! once, before its TLS handshake, and counted. When every place is taken,
//! the connection that has waited longest for a request head (a slow one,
//! or one idle after its answer) is closed to make room, so strangers with
//! many addresses holding slow connections cannot keep a quick client out;
//! a request in flight (a node's long poll) is never closed for that, and a
//! newcomer finds the door shut only when every place holds one. Slow and
//! idle connections are also closed by the timeouts of TLS (handshake) and
//! HTTP (request head), so each holds its place for seconds, not for ever.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use axum_server::accept::Accept;
use comsat_protocol::endpoint::source_of;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Where a connection stands, as its bytes show it (HTTP/1.1 only).
const WAITING: u8 = 0;
/// A request head was read and nothing answered yet: a request in flight
/// (a long poll, perhaps). Never evicted.
const IN_REQUEST: u8 = 1;

/// One admitted connection, as the [`Slots`] see it.
#[derive(Debug)]
struct Conn {
    source: IpAddr,
    /// [`WAITING`] (in its TLS handshake, reading a request head, or idle
    /// after an answer) or [`IN_REQUEST`].
    state: AtomicU8,
    /// When it entered its state, microseconds after the [`Slots`] began.
    since: AtomicU64,
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Conn {
    fn lock_waker(&self) -> MutexGuard<'_, Option<Waker>> {
        self.waker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether it was evicted; if not, `cx` is woken when it is.
    fn poll_evicted(&self, cx: &Context<'_>) -> bool {
        if self.evicted.load(Ordering::Acquire) {
            return true;
        }
        let mut w = self.lock_waker();
        match &*w {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => *w = Some(cx.waker().clone()),
        }
        drop(w);
        self.evicted.load(Ordering::Acquire)
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        if let Some(w) = self.lock_waker().take() {
            w.wake();
        }
    }
}

/// The open connections, in all and by source.
#[derive(Debug)]
pub(crate) struct Slots {
    max: usize,
    per_source: usize,
    began: Instant,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    next: u64,
    conns: HashMap<u64, Arc<Conn>>,
    by_source: HashMap<IpAddr, usize>,
}

impl Slots {
    pub(crate) fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_source,
            began: Instant::now(),
            open: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        self.began.elapsed().as_micros() as u64
    }

    /// A slot for a connection from `ip`, or `None` when its source holds
    /// its share, or every slot is taken by a request in flight. When all
    /// slots are taken, the connection that has waited longest for a
    /// request head (a slow one, or one idle after its answer) is evicted
    /// to make room: a flood of slow connections cannot keep a quick
    /// client out.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let source = source_of(ip);
        let mut open = self.lock();
        let from_source = open.by_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.per_source {
            return None;
        }
        let live = open
            .conns
            .values()
            .filter(|c| !c.evicted.load(Ordering::Relaxed))
            .count();
        if live >= self.max {
            let victim = open
                .conns
                .values()
                .filter(|c| {
                    !c.evicted.load(Ordering::Relaxed) && c.state.load(Ordering::Relaxed) == WAITING
                })
                .min_by_key(|c| c.since.load(Ordering::Relaxed))?;
            tracing::debug!(evicted = %victim.source, "all connections taken: the one waiting longest for a request is closed");
            victim.evict();
        }
        let conn = Arc::new(Conn {
            source,
            state: AtomicU8::new(WAITING),
            since: AtomicU64::new(self.now()),
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        let id = open.next;
        open.next += 1;
        open.conns.insert(id, conn.clone());
        *open.by_source.entry(source).or_default() += 1;
        Some(Slot {
            slots: self.clone(),
            id,
            conn,
            head_tail: 0,
        })
    }

    fn give_back(&self, id: u64, source: IpAddr) {
        let mut open = self.lock();
        open.conns.remove(&id);
        if let Some(n) = open.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&source);
            }
        }
    }
}

/// One admitted connection's place, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    conn: Arc<Conn>,
    /// The last bytes read while waiting for a request head: `\r\n\r\n`
    /// ends one (a request's body or the next request's head are not told
    /// apart from it; only a server answer makes the connection wait anew).
    head_tail: u32,
}

impl Slot {
    /// `bytes` were read from the client.
    fn on_read(&mut self, bytes: &[u8]) {
        if self.conn.state.load(Ordering::Relaxed) != WAITING {
            return;
        }
        for &b in bytes {
            self.head_tail = (self.head_tail << 8) | u32::from(b);
            if self.head_tail == u32::from_be_bytes(*b"\r\n\r\n") {
                self.head_tail = 0;
                self.enter(IN_REQUEST);
                return;
            }
        }
    }

    /// Passes on what a write did, noting an answer written.
    fn wrote(&mut self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.on_written();
        }
        polled
    }

    /// The server answered: the connection waits for its next request.
    fn on_written(&mut self) {
        if self.conn.state.load(Ordering::Relaxed) != WAITING {
            self.enter(WAITING);
        }
    }

    fn enter(&self, state: u8) {
        self.conn.since.store(self.slots.now(), Ordering::Relaxed);
        self.conn.state.store(state, Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.give_back(self.id, self.conn.source);
    }
}

fn evicted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "evicted: every connection was taken",
    )
}

/// An acceptor that admits a connection only within [`Slots`], then hands
/// it to `inner` (the TLS acceptor).
#[derive(Clone, Debug)]
pub(crate) struct Admit<A> {
    inner: A,
    slots: Arc<Slots>,
}

impl<A> Admit<A> {
    pub(crate) fn new(inner: A, slots: Arc<Slots>) -> Self {
        Self { inner, slots }
    }
}

impl<A, S> Accept<TcpStream, S> for Admit<A>
where
    A: Accept<TcpStream, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Admitted<A::Stream>;
    type Service = A::Service;
    type Future =
        Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send + 'static>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let peer = stream.peer_addr().ok().map(|a: SocketAddr| a.ip());
        let Some(slot) = peer.and_then(|ip| self.slots.take(ip)) else {
            tracing::debug!(peer = ?peer, "connection over a cap; closed");
            drop(stream);
            return Box::pin(async { Err(io::Error::other("connection cap reached; closed")) });
        };
        let handshake = self.inner.accept(stream, service);
        Box::pin(async move {
            let conn = slot.conn.clone();
            let gone = std::future::poll_fn(|cx| {
                if conn.poll_evicted(cx) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            let (stream, service) = tokio::select! {
                done = handshake => done?,
                () = gone => return Err(evicted()),
            };
            Ok((Admitted { stream, slot }, service))
        })
    }
}

/// An admitted connection: the stream and its slot.
#[derive(Debug)]
pub(crate) struct Admitted<T> {
    stream: T,
    slot: Slot,
}

impl<T: AsyncRead + Unpin> AsyncRead for Admitted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.slot.conn.poll_evicted(cx) {
            return Poll::Ready(Err(evicted()));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.slot.on_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Admitted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.slot
            .wrote(Pin::new(&mut this.stream).poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.slot
            .wrote(Pin::new(&mut this.stream).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn in_request(slot: &mut Slot) {
        slot.on_read(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[test]
    fn the_cap_per_source_holds_and_slots_come_back() {
        let slots = Slots::new(10, 2);
        let first = slots.take(ip("2001:db8::1")).expect("first from a");
        let _second = slots.take(ip("2001:db8::2")).expect("second from a's /64");
        assert!(
            slots.take(ip("2001:db8::3")).is_none(),
            "a's /64 holds its 2"
        );
        let _b = slots.take(ip("192.0.2.1")).expect("b has its own");
        drop(first);
        assert!(slots.take(ip("2001:db8::1")).is_some(), "a slot came back");
    }

    #[test]
    fn a_full_house_evicts_the_connection_waiting_longest_for_a_request() {
        let slots = Slots::new(3, 3);
        let slow = slots.take(ip("192.0.2.1")).expect("slow");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut busy = slots.take(ip("192.0.2.1")).expect("busy");
        in_request(&mut busy);
        let newer = slots.take(ip("192.0.2.2")).expect("newer");
        // Full: the newcomer gets the place of the oldest one waiting; the
        // request in flight (a long poll) is left alone.
        let quick = slots.take(ip("192.0.2.3")).expect("evicts one");
        assert!(slow.conn.evicted.load(Ordering::Relaxed));
        assert!(!busy.conn.evicted.load(Ordering::Relaxed));
        assert!(!newer.conn.evicted.load(Ordering::Relaxed));
        assert!(!quick.conn.evicted.load(Ordering::Relaxed));
        drop((slow, newer, quick));
        assert!(slots.lock().conns.len() == 1, "places come back");
    }

    #[test]
    fn an_answered_connection_waits_anew_and_requests_in_flight_are_never_evicted() {
        let slots = Slots::new(2, 2);
        let mut a = slots.take(ip("192.0.2.1")).expect("a");
        let mut b = slots.take(ip("192.0.2.1")).expect("b");
        in_request(&mut a);
        in_request(&mut b);
        assert!(
            slots.take(ip("192.0.2.2")).is_none(),
            "every place holds a request in flight"
        );
        // b was answered: idle between requests, it may go.
        b.on_written();
        assert!(slots.take(ip("192.0.2.2")).is_some());
        assert!(b.conn.evicted.load(Ordering::Relaxed));
        assert!(!a.conn.evicted.load(Ordering::Relaxed));
    }

    #[test]
    fn a_request_head_is_seen_across_reads() {
        let slots = Slots::new(1, 1);
        let mut s = slots.take(ip("192.0.2.1")).expect("s");
        s.on_read(b"GET / HTTP/1.1\r\n\r");
        assert_eq!(s.conn.state.load(Ordering::Relaxed), WAITING);
        s.on_read(b"\n");
        assert_eq!(s.conn.state.load(Ordering::Relaxed), IN_REQUEST);
    }

    #[tokio::test]
    async fn an_evicted_connection_reads_an_error_at_once() {
        let slots = Slots::new(1, 1);
        let (client, server) = tokio::io::duplex(64);
        let slot = slots.take(ip("192.0.2.1")).expect("slot");
        let mut admitted = Admitted {
            stream: server,
            slot,
        };
        let read = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 8];
            admitted.read(&mut buf).await
        });
        tokio::task::yield_now().await;
        let _newcomer = slots.take(ip("192.0.2.2")).expect("evicts the first");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(
            got.expect_err("evicted").kind(),
            io::ErrorKind::ConnectionAborted
        );
        drop(client);
    }
}
