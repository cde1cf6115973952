//! UDP traffic of the relay's agent connections, for `/metrics`: what
//! QUIC put on the wire (acknowledgements, retransmissions and headers
//! included), so an operator can see the overhead over the bytes forwarded.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Datagrams and UDP payload bytes, received and sent.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    rx_bytes: u64,
    rx_datagrams: u64,
    tx_bytes: u64,
    tx_datagrams: u64,
}

impl Totals {
    fn add(&mut self, conn: &quinn::Connection) {
        let s = conn.stats();
        self.rx_bytes += s.udp_rx.bytes;
        self.rx_datagrams += s.udp_rx.datagrams;
        self.tx_bytes += s.udp_tx.bytes;
        self.tx_datagrams += s.udp_tx.datagrams;
    }
}

/// The authenticated connections still open, and the sums of those that
/// closed.
#[derive(Default)]
pub(crate) struct WireStats {
    inner: Mutex<(HashMap<u64, quinn::Connection>, Totals)>,
}

impl WireStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<u64, quinn::Connection>, Totals)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `conn` from now until [`Self::close`].
    pub(crate) fn open(&self, id: u64, conn: &quinn::Connection) {
        self.lock().0.insert(id, conn.clone());
    }

    /// Moves connection `id`'s traffic into the closed sums.
    pub(crate) fn close(&self, id: u64) {
        let mut g = self.lock();
        if let Some(conn) = g.0.remove(&id) {
            g.1.add(&conn);
        }
    }

    /// Prometheus text: `comsat_relay_udp_bytes_total` and
    /// `comsat_relay_udp_datagrams_total` by direction.
    pub(crate) fn render(&self) -> String {
        // One lock over both: a connection moving to the closed sums is
        // counted once, so the counters never go backwards.
        let t = {
            let g = self.lock();
            let mut t = g.1;
            for conn in g.0.values() {
                t.add(conn);
            }
            t
        };
        let mut out = String::new();
        for (name, help, rx, tx) in [
            (
                "comsat_relay_udp_bytes_total",
                "UDP payload bytes of agent connections (QUIC packets: headers, acknowledgements and retransmissions included)",
                t.rx_bytes,
                t.tx_bytes,
            ),
            (
                "comsat_relay_udp_datagrams_total",
                "UDP datagrams of agent connections",
                t.rx_datagrams,
                t.tx_datagrams,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name}{{direction=\"rx\"}} {rx}");
            let _ = writeln!(out, "{name}{{direction=\"tx\"}} {tx}");
        }
        out
    }
}
