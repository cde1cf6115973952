//! Admission of HTTPS connections, before TLS and HTTP: at most
//! `max_connections` open at once, and at most `max_connections_per_source`
//! from one source (an IPv4 address, or an IPv6 /64, which one machine
//! usually holds whole). A connection over either cap is closed at once,
//! before its TLS handshake, and counted; the slots of those admitted come
//! back when they close. Slow and idle connections are closed by the
//! timeouts of TLS (handshake) and HTTP (request head), so a flood of them
//! holds slots for seconds, not for ever.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum_server::accept::Accept;
use comsat_protocol::endpoint::source_of;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The open connections, in all and by source.
#[derive(Debug)]
pub(crate) struct Slots {
    max: usize,
    per_source: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Slots {
    pub(crate) fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_source,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for a connection from `ip`, or `None` when a cap is reached.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let source = source_of(ip);
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let from_source = open.1.get(&source).copied().unwrap_or(0);
        if open.0 >= self.max || from_source >= self.per_source {
            return None;
        }
        open.0 += 1;
        open.1.insert(source, from_source + 1);
        Some(Slot {
            slots: self.clone(),
            source,
        })
    }

    fn give_back(&self, source: IpAddr) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&source);
            }
        }
    }
}

/// One admitted connection's place, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.give_back(self.source);
    }
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
            let (stream, service) = handshake.await?;
            Ok((
                Admitted {
                    stream,
                    _slot: slot,
                },
                service,
            ))
        })
    }
}

/// An admitted connection: the stream and its slot.
#[derive(Debug)]
pub(crate) struct Admitted<T> {
    stream: T,
    _slot: Slot,
}

impl<T: AsyncRead + Unpin> AsyncRead for Admitted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Admitted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
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
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_source_and_in_all_and_slots_come_back() {
        let slots = Slots::new(3, 2);
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let a2: IpAddr = "2001:db8::2".parse().expect("ip");
        let b: IpAddr = "192.0.2.1".parse().expect("ip");
        let first = slots.take(a).expect("first from a");
        let _second = slots.take(a2).expect("second from a's /64");
        assert!(slots.take(a).is_none(), "a's /64 holds its 2");
        let _third = slots.take(b).expect("b has its own");
        assert!(
            slots.take("192.0.2.2".parse().expect("ip")).is_none(),
            "3 in all"
        );
        drop(first);
        assert!(slots.take(a).is_some(), "a slot came back");
    }
}
