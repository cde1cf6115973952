//! A hostile relay: the real relay, run in the test's process, with an
//! [`Adversary`] that records every flow stream and handshake passing
//! through, keeps a ledger of the nonces each agent sealed under, and
//! attacks records and frames as the test tells it.
//!
//! The ledger is the relay's own view: a record's nonce is
//! `(flow_id << 40) | seq`, both in clear on the wire, and its sealer is the
//! agent whose stream carried it. A record sent again after a reconnect is
//! byte-identical and counts once. The same flow id can come back under
//! other keys (a new generation of flow ids, a new session, an agent
//! restart); the relay tells such a new instance of a flow id from its
//! first record: every flow starts with an `Open` at seq 0 whose plaintext
//! is always the same, so under the same key and nonce it would be the same
//! ciphertext, and a different one proves a different key. Records are
//! noted per `(sealer, flow, instance, seq)`: two different ciphertexts
//! there mean one key sealed two records under one nonce.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use comsat_protocol::msg::PeerFrame;
use comsat_protocol::record::{FlowHeader, decode_record};
use comsat_protocol::{FlowId, LinkId, Side};
use comsat_relay::adversary::{Adversary, Tamper, Tampered};
use sha2::{Digest, Sha256};

/// What the relay does to the records of the next flow stream it splices,
/// in the direction of the agent that opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordAttack {
    /// Forward every record unchanged.
    None,
    /// Flip one bit in the ciphertext of record `n` of each stream.
    FlipBit(u64),
    /// Send record `n` of each stream twice.
    Duplicate(u64),
    /// Leave out record `n` of each stream.
    Drop(u64),
    /// Send record `n + 1` of each stream before record `n`.
    Swap(u64),
    /// Cut record `n` short: its header and half its ciphertext, then the
    /// stream ends.
    Truncate(u64),
    /// Reset the stream (both directions) at record `n`.
    Reset(u64),
    /// Hold record `n` back for this many milliseconds.
    Delay(u64, u64),
}

/// What the relay does to handshake and sealed messages from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameAttack {
    /// Forward every frame unchanged.
    None,
    /// Deliver every frame twice.
    Duplicate,
    /// Deliver no frame at all.
    Drop,
}

/// What the relay does to the datagrams of UDP flows from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatagramAttack {
    /// Forward every datagram unchanged.
    None,
    /// Send every datagram twice.
    Duplicate,
}

/// One direction of one flow stream, as the relay forwarded it.
#[derive(Clone, Debug)]
pub struct Recording {
    /// The link.
    pub link: LinkId,
    /// The flow.
    pub flow: FlowId,
    /// The agent that sealed (sent) these bytes.
    pub sealer: Side,
    /// Whether this is the direction of the stream's opener.
    pub opener: bool,
    /// The records as they arrived from the sealer.
    pub bytes: Arc<Mutex<Vec<u8>>>,
    /// The sealer finished the stream.
    pub finished: Arc<AtomicBool>,
}

impl Recording {
    /// The stream as a relay would open it anew: flow header, then the
    /// records (only the opener's direction starts with a header).
    pub fn replay_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.opener {
            FlowHeader {
                link_id: self.link,
                flow_id: self.flow,
            }
            .write_to(&mut out);
        }
        out.extend_from_slice(&crate::lock(&self.bytes));
        out
    }
}

/// `(link, sealer, flow, instance, seq)`.
type LedgerKey = (LinkId, Side, FlowId, u64, u64);

/// Per `(link, opener, flow)`: the instance of the flow id now, and the
/// ciphertext digest of its `Open`.
type Instances = HashMap<(LinkId, Side, FlowId), (u64, [u8; 32])>;

/// The nonces each agent sealed under, as the relay saw them.
#[derive(Default)]
struct Ledger {
    seen: Mutex<HashMap<LedgerKey, [u8; 32]>>,
    instances: Mutex<Instances>,
    reused: Mutex<Vec<String>>,
    records: std::sync::atomic::AtomicU64,
    /// Record attacks carried out.
    attacks: std::sync::atomic::AtomicU64,
}

impl Ledger {
    /// Notes record `seq` of `flow` sealed by `sealer` (the flow's opener if
    /// `opener`).
    fn note(
        &self,
        (link, sealer, flow): (LinkId, Side, FlowId),
        opener: bool,
        seq: u64,
        ciphertext: &[u8],
    ) {
        self.records.fetch_add(1, Ordering::Relaxed);
        let digest: [u8; 32] = Sha256::digest(ciphertext).into();
        let opener_side = if opener { sealer } else { sealer.peer() };
        let instance = {
            let mut instances = crate::lock(&self.instances);
            let entry = instances.entry((link, opener_side, flow));
            if opener && seq == 0 {
                let slot = entry.or_insert((0, digest));
                if slot.1 != digest {
                    *slot = (slot.0 + 1, digest);
                }
                slot.0
            } else {
                entry.or_insert((0, [0; 32])).0
            }
        };
        let key = (link, sealer, flow, instance, seq);
        let mut seen = crate::lock(&self.seen);
        if let Some(before) = seen.insert(key, digest)
            && before != digest
        {
            crate::lock(&self.reused).push(format!(
                    "link {} side {sealer:?} flow {flow} (instance {instance}) seq {seq}: two ciphertexts",
                    link.fmt_short()
                ));
        }
    }
}

/// The hostile relay's adversary (see the module docs).
#[derive(Default)]
pub struct Hostile {
    records: Mutex<Vec<Recording>>,
    frames: Mutex<Vec<(LinkId, Side, PeerFrame)>>,
    ledger: Arc<Ledger>,
    record_attack: Mutex<Option<RecordAttack>>,
    frame_attack: Mutex<Option<FrameAttack>>,
    datagrams: Mutex<Vec<(LinkId, Side, Bytes)>>,
    datagram_attack: Mutex<Option<DatagramAttack>>,
}

impl Hostile {
    /// A relay adversary that forwards everything, recording it.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Attacks the records of the next stream spliced (once).
    pub fn set_record_attack(&self, attack: RecordAttack) {
        *crate::lock(&self.record_attack) = Some(attack);
    }

    /// Attacks the handshake and sealed messages forwarded from now on.
    pub fn set_frame_attack(&self, attack: FrameAttack) {
        *crate::lock(&self.frame_attack) = Some(attack);
    }

    /// Attacks the datagrams of UDP flows forwarded from now on.
    pub fn set_datagram_attack(&self, attack: DatagramAttack) {
        *crate::lock(&self.datagram_attack) = Some(attack);
    }

    /// Every datagram forwarded so far (link id in front), with its link
    /// and the side that sent it.
    pub fn datagrams(&self) -> Vec<(LinkId, Side, Bytes)> {
        crate::lock(&self.datagrams).clone()
    }

    /// Every flow stream direction recorded so far.
    pub fn recordings(&self) -> Vec<Recording> {
        crate::lock(&self.records).clone()
    }

    /// The first recording of flow `flow`'s direction sealed by `sealer`.
    pub fn recording(&self, flow: FlowId, sealer: Side) -> Option<Recording> {
        self.recordings()
            .into_iter()
            .find(|r| r.flow == flow && r.sealer == sealer)
    }

    /// Every handshake and sealed message forwarded so far, with its link
    /// and the side that sent it.
    pub fn frames(&self) -> Vec<(LinkId, Side, PeerFrame)> {
        crate::lock(&self.frames).clone()
    }

    /// Records seen so far, all streams together.
    pub fn records_seen(&self) -> u64 {
        self.ledger.records.load(Ordering::Relaxed)
    }

    /// Record attacks carried out so far.
    pub fn attacks_done(&self) -> u64 {
        self.ledger.attacks.load(Ordering::Relaxed)
    }

    /// Distinct `(sealer, flow, seq)` nonces in the ledger.
    pub fn nonces_seen(&self) -> usize {
        crate::lock(&self.ledger.seen).len()
    }

    /// Each nonce seen under two different ciphertexts.
    pub fn reused_nonces(&self) -> Vec<String> {
        crate::lock(&self.ledger.reused).clone()
    }

    /// The highest seq each `(sealer, flow, instance)` sealed so far.
    pub fn highest_seqs(&self) -> HashMap<(Side, FlowId, u64), u64> {
        let mut out: HashMap<(Side, FlowId, u64), u64> = HashMap::new();
        for (_, side, flow, instance, seq) in crate::lock(&self.ledger.seen).keys() {
            let e = out.entry((*side, *flow, *instance)).or_default();
            *e = (*e).max(*seq);
        }
        out
    }

    /// How many instances of flow ids were told apart so far (see the
    /// module docs): flows opened, new generations and sessions included.
    pub fn flow_instances(&self) -> usize {
        crate::lock(&self.ledger.instances)
            .values()
            .map(|(i, _)| *i as usize + 1)
            .sum()
    }
}

impl Adversary for Hostile {
    fn peer_frame(&self, link: LinkId, from: Side, frame: PeerFrame) -> Vec<PeerFrame> {
        crate::lock(&self.frames).push((link, from, frame.clone()));
        match (*crate::lock(&self.frame_attack)).unwrap_or(FrameAttack::None) {
            FrameAttack::None => vec![frame],
            FrameAttack::Duplicate => vec![frame.clone(), frame],
            FrameAttack::Drop => Vec::new(),
        }
    }

    fn datagram(&self, link: LinkId, from: Side, datagram: Bytes) -> Vec<Bytes> {
        crate::lock(&self.datagrams).push((link, from, datagram.clone()));
        match (*crate::lock(&self.datagram_attack)).unwrap_or(DatagramAttack::None) {
            DatagramAttack::None => vec![datagram],
            DatagramAttack::Duplicate => vec![datagram.clone(), datagram],
        }
    }

    fn flow(
        &self,
        link: LinkId,
        flow: FlowId,
        from: Side,
    ) -> Option<(Box<dyn Tamper>, Box<dyn Tamper>)> {
        let attack = crate::lock(&self.record_attack)
            .take()
            .unwrap_or(RecordAttack::None);
        let make = |sealer: Side, opener: bool, attack: RecordAttack| -> Box<dyn Tamper> {
            let recording = Recording {
                link,
                flow,
                sealer,
                opener,
                bytes: Arc::default(),
                finished: Arc::default(),
            };
            crate::lock(&self.records).push(recording.clone());
            Box::new(Records {
                ledger: self.ledger.clone(),
                recording,
                attack,
                buf: Vec::new(),
                n: 0,
                held: None,
            })
        };
        let forward = make(from, true, attack);
        Some((forward, make(from.peer(), false, RecordAttack::None)))
    }
}

/// One direction of a stream: cut into whole records, noted in the
/// ledger, attacked, forwarded.
struct Records {
    ledger: Arc<Ledger>,
    recording: Recording,
    attack: RecordAttack,
    buf: Vec<u8>,
    /// Records of this direction so far.
    n: u64,
    /// A record held back to be sent after the next one.
    held: Option<Bytes>,
}

impl Tamper for Records {
    fn chunk(&mut self, chunk: Bytes) -> Tampered {
        crate::lock(&self.recording.bytes).extend_from_slice(&chunk);
        self.buf.extend_from_slice(&chunk);
        let mut out = Vec::new();
        let mut delay = None;
        loop {
            let (seq, ct_len, used) = match decode_record(&self.buf) {
                Ok(Some((h, ct, used))) => (h.seq, ct.len(), used),
                Ok(None) => break,
                Err(_) => {
                    // Not records (any more): pass the rest on as it is.
                    out.push(Bytes::from(std::mem::take(&mut self.buf)));
                    break;
                }
            };
            let record: Vec<u8> = self.buf.drain(..used).collect();
            let r = &self.recording;
            self.ledger.note(
                (r.link, r.sealer, r.flow),
                r.opener,
                seq,
                &record[used - ct_len..],
            );
            let n = self.n;
            self.n += 1;
            let record = Bytes::from(record);
            let hit = match self.attack {
                RecordAttack::None => false,
                RecordAttack::FlipBit(k)
                | RecordAttack::Duplicate(k)
                | RecordAttack::Drop(k)
                | RecordAttack::Swap(k)
                | RecordAttack::Truncate(k)
                | RecordAttack::Reset(k)
                | RecordAttack::Delay(k, _) => k == n,
            };
            if hit {
                self.ledger.attacks.fetch_add(1, Ordering::Relaxed);
            }
            match self.attack {
                RecordAttack::FlipBit(k) if k == n => {
                    let mut flipped = record.to_vec();
                    let last = flipped.len() - 1;
                    flipped[last] ^= 0x01;
                    out.push(Bytes::from(flipped));
                }
                RecordAttack::Duplicate(k) if k == n => {
                    out.push(record.clone());
                    out.push(record);
                }
                RecordAttack::Drop(k) if k == n => {}
                RecordAttack::Swap(k) if k == n => self.held = Some(record),
                RecordAttack::Truncate(k) if k == n => {
                    out.push(record.slice(..record.len() - ct_len / 2));
                    return Tampered::Finish(out);
                }
                RecordAttack::Reset(k) if k == n => return Tampered::Reset,
                RecordAttack::Delay(k, ms) if k == n => {
                    out.push(record);
                    delay = Some(std::time::Duration::from_millis(ms));
                }
                _ => {
                    out.push(record);
                    if let Some(held) = self.held.take() {
                        out.push(held);
                    }
                }
            }
        }
        match delay {
            Some(wait) => Tampered::Delay(wait, out),
            None => Tampered::Forward(out),
        }
    }

    fn finish(&mut self) -> Vec<Bytes> {
        self.recording.finished.store(true, Ordering::Relaxed);
        self.held.take().into_iter().collect()
    }
}
