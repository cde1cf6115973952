//! A link's UDP flows, sans IO: which local address each flow stands for,
//! and when a flow has been idle long enough to forget.
//!
//! UDP has no connections, so a flow is what a stateful firewall makes of
//! it (Linux conntrack does the same): side A's listener gives every local
//! source address a flow of its own, numbered by A; side B gives every
//! flow a socket of its own connected to the target, so the target's
//! answers find their way back. A flow is forgotten after a quiet spell:
//! short while only one direction has spoken (a query nobody answered),
//! longer once both have (conntrack's 30 s and 120 s).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use comsat_protocol::noise::UdpFlowId;

/// How long a flow lives without traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Idle {
    /// While only the side that started it has sent.
    pub(crate) unreplied: Duration,
    /// Once both sides have.
    pub(crate) replied: Duration,
}

/// The link is at its most flows: a datagram that would start another is
/// dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Full;

struct Entry<T> {
    value: T,
    last: Instant,
    replied: bool,
}

/// A link's flows by id, each with what the driver keeps for it (an
/// address, a socket) and when it last carried a datagram.
pub(crate) struct Flows<T> {
    flows: HashMap<UdpFlowId, Entry<T>>,
    max: usize,
    idle: Idle,
}

impl<T> Flows<T> {
    pub(crate) fn new(max: usize, idle: Idle) -> Self {
        Self {
            flows: HashMap::new(),
            max,
            idle,
        }
    }

    /// Flows alive now.
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// A datagram of flow `id` arrived from the side that started it.
    pub(crate) fn touch(&mut self, id: UdpFlowId, now: Instant) -> Option<&T> {
        let e = self.flows.get_mut(&id)?;
        e.last = now;
        Some(&e.value)
    }

    /// A datagram of flow `id` went the other way: the flow is answered.
    pub(crate) fn reply(&mut self, id: UdpFlowId, now: Instant) -> Option<&T> {
        let e = self.flows.get_mut(&id)?;
        e.last = now;
        e.replied = true;
        Some(&e.value)
    }

    /// Starts flow `id` (which must be new) holding `value`, unless the
    /// link is at its most flows.
    pub(crate) fn start(&mut self, id: UdpFlowId, value: T, now: Instant) -> Result<&T, Full> {
        if self.flows.len() >= self.max {
            return Err(Full);
        }
        let e = self.flows.entry(id).or_insert(Entry {
            value,
            last: now,
            replied: false,
        });
        Ok(&e.value)
    }

    /// Removes and returns the flows idle for longer than they may be.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<(UdpFlowId, T)> {
        let idle = self.idle;
        let gone: Vec<UdpFlowId> = self
            .flows
            .iter()
            .filter(|(_, e)| {
                let limit = if e.replied {
                    idle.replied
                } else {
                    idle.unreplied
                };
                now.saturating_duration_since(e.last) > limit
            })
            .map(|(id, _)| *id)
            .collect();
        gone.into_iter()
            .filter_map(|id| self.flows.remove(&id).map(|e| (id, e.value)))
            .collect()
    }

    /// Removes every flow (the link is gone).
    pub(crate) fn clear(&mut self) -> Vec<T> {
        self.flows.drain().map(|(_, e)| e.value).collect()
    }
}

/// Side A's flows: one per local source address, numbered here.
pub(crate) struct Sources {
    flows: Flows<SocketAddr>,
    by_addr: HashMap<SocketAddr, UdpFlowId>,
    next: UdpFlowId,
}

impl Sources {
    pub(crate) fn new(max: usize, idle: Idle) -> Self {
        Self {
            flows: Flows::new(max, idle),
            by_addr: HashMap::new(),
            next: 0,
        }
    }

    /// Flows alive now.
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Numbers the next new flow `next` (to test the counter's wrap).
    #[cfg(test)]
    pub(crate) fn set_next(&mut self, next: UdpFlowId) {
        self.next = next;
    }

    /// The flow of a datagram from local address `from`: its own, or a
    /// new one (`true`) numbered after the last (skipping numbers still in
    /// use once they wrap), unless the link is at its most flows.
    pub(crate) fn outbound(
        &mut self,
        from: SocketAddr,
        now: Instant,
    ) -> Result<(UdpFlowId, bool), Full> {
        if let Some(&id) = self.by_addr.get(&from) {
            self.flows.touch(id, now);
            return Ok((id, false));
        }
        let mut id = self.next;
        while self.flows.flows.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.flows.start(id, from, now)?;
        self.next = id.wrapping_add(1);
        self.by_addr.insert(from, id);
        Ok((id, true))
    }

    /// Where an answer for flow `id` goes; `None` once the flow is
    /// forgotten.
    pub(crate) fn inbound(&mut self, id: UdpFlowId, now: Instant) -> Option<SocketAddr> {
        self.flows.reply(id, now).copied()
    }

    /// Forgets the flows idle too long; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let gone = self.flows.expire(now);
        for (_, addr) in &gone {
            self.by_addr.remove(addr);
        }
        gone.len()
    }
}
