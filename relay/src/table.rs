//! The relay's pairing and buffering decisions, without I/O.
//!
//! [`Table`] knows which connection holds which side of which link (and
//! which holds a side's lane), when a link is paired, which bytes parked
//! flows hold against their link's `buffer_limit` and the relay-wide
//! budget, and whether the relay is draining. Its methods take ids and
//! sizes and return what the server must do next (close a superseded
//! connection, tell a peer it is alone, wake parked flows); the server
//! keeps every socket, stream and task.
//!
//! Each link present in the table carries a value of the server's own
//! (`L`: its signals and counters), created on the link's first attach and
//! dropped when the link leaves the table.

use std::collections::HashMap;

use comsat_protocol::{LinkId, Side};

/// A connection, as the server numbers them.
pub(crate) type ConnId = u64;

/// A parked flow, as the table numbers them.
pub(crate) type ParkId = u64;

/// How a connection holds a side of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    /// As the side itself: what makes the side present.
    Main,
    /// As the side's lane, a second connection that carries flows only.
    Lane,
}

/// Why an attach was refused by the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The relay is draining: links move to their next relay.
    Draining,
    /// The relay holds `max_links` links already.
    RelayFull,
}

/// What the server does after a successful attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attached {
    /// The connection that held the same place before, now stale: close it.
    pub(crate) superseded: Option<ConnId>,
    /// After a main attach: the side's lane from before it, now stale (an
    /// agent opens its lane only once its main connection is welcomed, and
    /// closes it with that connection): close it too.
    pub(crate) stale_lane: Option<ConnId>,
    /// The link became paired by this attach (count it).
    pub(crate) newly_paired: bool,
    /// Both sides' connections (A, B) if the link is paired after a main
    /// attach: tell both that their peer is present. Never set for a lane.
    pub(crate) present: Option<(ConnId, ConnId)>,
}

/// What the server does after a side left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Detached {
    /// The peer's connection, if the peer is attached: tell it it is alone.
    pub(crate) peer: Option<ConnId>,
    /// The link was paired until now (count it).
    pub(crate) unpaired: bool,
}

/// What is left of a link that ended.
#[derive(Debug)]
pub(crate) struct Ended<L> {
    /// Every connection that held the link (A, B, A's lane, B's lane, in
    /// that order): tell each why the link ended.
    pub(crate) conns: Vec<ConnId>,
    /// The link was paired.
    pub(crate) was_paired: bool,
    /// Bytes its parked flows held, released.
    pub(crate) released: u64,
    /// The server's value for the link.
    pub(crate) data: L,
}

/// Where a flow that arrived on a connection belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    /// The side the connection holds.
    pub(crate) side: Side,
    /// Whether it holds it as the side's lane.
    pub(crate) role: Role,
    /// Where the flow goes on to now; `None` while the peer is away.
    pub(crate) peer: Option<ConnId>,
}

/// One link's places.
#[derive(Debug)]
struct Entry<L> {
    main: [Option<ConnId>; 2],
    lane: [Option<ConnId>; 2],
    /// Bytes held for the link's parked flows.
    buffered: u64,
    data: L,
}

impl<L> Entry<L> {
    fn slot(&mut self, side: Side, role: Role) -> &mut Option<ConnId> {
        match role {
            Role::Main => &mut self.main[index(side)],
            Role::Lane => &mut self.lane[index(side)],
        }
    }

    fn held(&self, side: Side, role: Role) -> Option<ConnId> {
        match role {
            Role::Main => self.main[index(side)],
            Role::Lane => self.lane[index(side)],
        }
    }

    fn is_paired(&self) -> bool {
        self.main[0].is_some() && self.main[1].is_some()
    }

    fn is_empty(&self) -> bool {
        self.main.iter().chain(&self.lane).all(Option::is_none)
    }

    /// Where a flow of `side` goes on to: the peer's lane for a flow that
    /// came on `side`'s lane (if the peer has one), else the peer's main
    /// attachment. `None` while the peer is away (its main attachment is
    /// what makes it present; a lane without it carries nothing).
    fn peer(&self, side: Side, role: Role) -> Option<ConnId> {
        let peer = side.peer();
        let main = self.held(peer, Role::Main)?;
        Some(match role {
            Role::Lane => self.held(peer, Role::Lane).unwrap_or(main),
            Role::Main => main,
        })
    }
}

/// Bytes one parked flow holds.
#[derive(Debug)]
struct Park {
    link: LinkId,
    bytes: u64,
}

/// Every link attached here, and what their parked flows hold.
#[derive(Debug)]
pub(crate) struct Table<L> {
    links: HashMap<LinkId, Entry<L>>,
    parks: HashMap<ParkId, Park>,
    next_park: ParkId,
    /// Bytes held for parked flows, all links together.
    buffered: u64,
    draining: bool,
}

impl<L> Default for Table<L> {
    fn default() -> Self {
        Self {
            links: HashMap::new(),
            parks: HashMap::new(),
            next_park: 1,
            buffered: 0,
            draining: false,
        }
    }
}

fn index(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

impl<L> Table<L> {
    /// Attaches `side` of `link` on connection `conn` in `role`. A link new
    /// to the table gets `data()`, and is refused if `max_links` links are
    /// here already; every attach is refused while draining. A side (or
    /// lane) held by another connection moves to `conn`: the old one is
    /// [`Attached::superseded`].
    pub(crate) fn attach(
        &mut self,
        link: LinkId,
        side: Side,
        role: Role,
        conn: ConnId,
        max_links: usize,
        data: impl FnOnce() -> L,
    ) -> Result<Attached, Refusal> {
        if self.draining {
            return Err(Refusal::Draining);
        }
        if !self.links.contains_key(&link) && self.links.len() >= max_links {
            return Err(Refusal::RelayFull);
        }
        let entry = self.links.entry(link).or_insert_with(|| Entry {
            main: [None; 2],
            lane: [None; 2],
            buffered: 0,
            data: data(),
        });
        let was_paired = entry.is_paired();
        let superseded = entry
            .slot(side, role)
            .replace(conn)
            .filter(|old| *old != conn);
        // Connection ids grow: a lane with a lower id than the new main
        // connection was opened before it, by an earlier one.
        let lane = entry.slot(side, Role::Lane);
        let stale_lane = match (role, *lane) {
            (Role::Main, Some(l)) if l < conn => lane.take(),
            _ => None,
        };
        let paired = entry.is_paired();
        let present = match (role, entry.main) {
            (Role::Main, [Some(a), Some(b)]) => Some((a, b)),
            _ => None,
        };
        Ok(Attached {
            superseded,
            stale_lane,
            newly_paired: !was_paired && paired,
            present,
        })
    }

    /// Gives up `side` of `link` in `role` if connection `conn` holds it
    /// (a newer connection may have taken it over); `None` if it does not.
    /// A link nobody holds any more leaves the table, releasing what its
    /// parked flows held.
    pub(crate) fn detach(
        &mut self,
        link: LinkId,
        side: Side,
        role: Role,
        conn: ConnId,
    ) -> Option<Detached> {
        let entry = self.links.get_mut(&link)?;
        if entry.held(side, role) != Some(conn) {
            return None;
        }
        let was_paired = entry.is_paired();
        *entry.slot(side, role) = None;
        let detached = Detached {
            peer: match role {
                Role::Main => entry.held(side.peer(), Role::Main),
                Role::Lane => None,
            },
            unpaired: was_paired && !entry.is_paired(),
        };
        if entry.is_empty() {
            self.remove(link);
        }
        Some(detached)
    }

    /// Ends `link` at once (revoked, expired): it leaves the table with
    /// everything its parked flows held. `None` if it is not here.
    pub(crate) fn end(&mut self, link: LinkId) -> Option<Ended<L>> {
        let entry = self.links.get(&link)?;
        let conns = entry
            .main
            .iter()
            .chain(&entry.lane)
            .flatten()
            .copied()
            .collect();
        let was_paired = entry.is_paired();
        let (released, data) = self.remove(link)?;
        Some(Ended {
            conns,
            was_paired,
            released,
            data,
        })
    }

    fn remove(&mut self, link: LinkId) -> Option<(u64, L)> {
        let entry = self.links.remove(&link)?;
        self.parks.retain(|_, p| p.link != link);
        self.buffered -= entry.buffered;
        Some((entry.buffered, entry.data))
    }

    /// The connection holding `side` of `link` (its main attachment).
    pub(crate) fn attached(&self, link: LinkId, side: Side) -> Option<ConnId> {
        self.links.get(&link)?.held(side, Role::Main)
    }

    /// Whether connection `conn` holds `side` of `link` (its main attachment).
    pub(crate) fn holds(&self, link: LinkId, side: Side, conn: ConnId) -> bool {
        self.attached(link, side) == Some(conn)
    }

    /// Both sides' connections (A, B) if `link` is paired.
    pub(crate) fn pair(&self, link: LinkId) -> Option<(ConnId, ConnId)> {
        match self.links.get(&link)?.main {
            [Some(a), Some(b)] => Some((a, b)),
            _ => None,
        }
    }

    /// Where a flow of `link` arriving on connection `conn` belongs; `None`
    /// if `conn` holds no side of the link.
    pub(crate) fn route(&self, link: LinkId, conn: ConnId) -> Option<Route> {
        let entry = self.links.get(&link)?;
        let (side, role) = [Side::A, Side::B].into_iter().find_map(|side| {
            [Role::Main, Role::Lane]
                .into_iter()
                .find(|role| entry.held(side, *role) == Some(conn))
                .map(|role| (side, role))
        })?;
        Some(Route {
            side,
            role,
            peer: entry.peer(side, role),
        })
    }

    /// Where a flow of `side` of `link` that came in `role` goes on to now:
    /// `None` while the peer is away or the link is gone.
    pub(crate) fn peer(&self, link: LinkId, side: Side, role: Role) -> Option<ConnId> {
        self.links.get(&link)?.peer(side, role)
    }

    /// The server's value for `link`, if the link is here.
    pub(crate) fn data(&self, link: LinkId) -> Option<&L> {
        self.links.get(&link).map(|e| &e.data)
    }

    /// Starts holding bytes for a flow of `link` whose peer is away; `None`
    /// if the link is not here.
    pub(crate) fn park(&mut self, link: LinkId) -> Option<ParkId> {
        if !self.links.contains_key(&link) {
            return None;
        }
        let id = self.next_park;
        self.next_park += 1;
        self.parks.insert(id, Park { link, bytes: 0 });
        Some(id)
    }

    /// Whether parked flow `park` may read more: its link holds less than
    /// `buffer_limit` and the relay less than `budget`. A flow at either
    /// limit waits (so QUIC flow control pushes back on its sender); one
    /// whose link ended may read nothing.
    pub(crate) fn room(&self, park: ParkId, buffer_limit: u64, budget: u64) -> bool {
        let Some(entry) = self.parks.get(&park).and_then(|p| self.links.get(&p.link)) else {
            return false;
        };
        entry.buffered < buffer_limit && self.buffered < budget
    }

    /// Counts `n` bytes read for parked flow `park` (a read may pass the
    /// limits by what it read: [`Self::room`] is asked before each read).
    /// Returns what the relay holds in all; unchanged if the park is gone.
    pub(crate) fn hold(&mut self, park: ParkId, n: u64) -> u64 {
        if let Some(p) = self.parks.get_mut(&park)
            && let Some(entry) = self.links.get_mut(&p.link)
        {
            p.bytes += n;
            entry.buffered += n;
            self.buffered += n;
        }
        self.buffered
    }

    /// Lets go of what parked flow `park` held (delivered, or the flow
    /// ended). Returns the bytes released and what the relay holds in all.
    pub(crate) fn unpark(&mut self, park: ParkId) -> (u64, u64) {
        let Some(p) = self.parks.remove(&park) else {
            return (0, self.buffered);
        };
        if let Some(entry) = self.links.get_mut(&p.link) {
            entry.buffered -= p.bytes;
        }
        self.buffered -= p.bytes;
        (p.bytes, self.buffered)
    }

    /// Bytes held for parked flows, all links together.
    pub(crate) fn buffered(&self) -> u64 {
        self.buffered
    }

    /// Bytes held for `link`'s parked flows.
    #[cfg(test)]
    pub(crate) fn link_buffered(&self, link: LinkId) -> u64 {
        self.links.get(&link).map_or(0, |e| e.buffered)
    }

    /// Starts draining: every attach is refused from now on. Returns how
    /// many links are attached.
    pub(crate) fn drain(&mut self) -> usize {
        self.draining = true;
        self.links.len()
    }

    /// Whether the relay drains and every link has left.
    pub(crate) fn is_drained(&self) -> bool {
        self.draining && self.links.is_empty()
    }

    /// How many links are attached.
    pub(crate) fn len(&self) -> usize {
        self.links.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANY: usize = 100;

    fn link(n: u8) -> LinkId {
        LinkId([n; 16])
    }

    fn table() -> Table<u32> {
        Table::default()
    }

    fn attach(t: &mut Table<u32>, l: LinkId, side: Side, role: Role, conn: ConnId) -> Attached {
        t.attach(l, side, role, conn, MANY, || 7).expect("attach")
    }

    #[test]
    fn one_side_waits_alone() {
        let mut t = table();
        let a = attach(&mut t, link(1), Side::A, Role::Main, 1);
        assert_eq!(a.superseded, None);
        assert!(!a.newly_paired);
        assert_eq!(a.present, None);
        assert_eq!(t.pair(link(1)), None);
        assert_eq!(t.peer(link(1), Side::A, Role::Main), None);
        assert_eq!(t.data(link(1)), Some(&7));
    }

    #[test]
    fn both_sides_pair_the_link() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        let b = attach(&mut t, link(1), Side::B, Role::Main, 2);
        assert!(b.newly_paired);
        assert_eq!(b.present, Some((1, 2)));
        assert_eq!(t.pair(link(1)), Some((1, 2)));
        assert_eq!(t.peer(link(1), Side::A, Role::Main), Some(2));
        assert_eq!(t.peer(link(1), Side::B, Role::Main), Some(1));
    }

    #[test]
    fn reattach_from_a_new_connection_supersedes_the_old() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        attach(&mut t, link(1), Side::B, Role::Main, 2);
        let again = attach(&mut t, link(1), Side::A, Role::Main, 3);
        assert_eq!(again.superseded, Some(1));
        assert!(!again.newly_paired, "the link was paired already");
        assert_eq!(again.present, Some((3, 2)));
        assert!(t.holds(link(1), Side::A, 3));
        assert!(!t.holds(link(1), Side::A, 1));
        // The old connection going away later leaves the new one in place.
        assert_eq!(t.detach(link(1), Side::A, Role::Main, 1), None);
        assert_eq!(t.pair(link(1)), Some((3, 2)));
    }

    #[test]
    fn reattach_on_the_same_connection_supersedes_nothing() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        let again = attach(&mut t, link(1), Side::A, Role::Main, 1);
        assert_eq!(again.superseded, None);
    }

    #[test]
    fn a_side_leaving_tells_its_peer_and_unpairs() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        attach(&mut t, link(1), Side::B, Role::Main, 2);
        let left = t.detach(link(1), Side::B, Role::Main, 2).expect("held");
        assert_eq!(
            left,
            Detached {
                peer: Some(1),
                unpaired: true
            }
        );
        assert_eq!(t.pair(link(1)), None);
        assert_eq!(t.len(), 1, "side A still holds the link");
        assert_eq!(t.peer(link(1), Side::A, Role::Main), None);
    }

    #[test]
    fn the_last_side_leaving_removes_the_link() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        let left = t.detach(link(1), Side::A, Role::Main, 1).expect("held");
        assert_eq!(
            left,
            Detached {
                peer: None,
                unpaired: false
            }
        );
        assert_eq!(t.len(), 0);
        assert_eq!(t.data(link(1)), None);
    }

    #[test]
    fn a_lane_never_pairs_and_never_makes_a_side_present() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        let lane = attach(&mut t, link(1), Side::B, Role::Lane, 2);
        assert!(!lane.newly_paired);
        assert_eq!(lane.present, None);
        assert_eq!(t.pair(link(1)), None);
        assert_eq!(t.peer(link(1), Side::A, Role::Main), None);
        assert_eq!(t.peer(link(1), Side::A, Role::Lane), None);
    }

    #[test]
    fn flows_route_by_the_connection_and_its_role() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        attach(&mut t, link(1), Side::A, Role::Lane, 11);
        attach(&mut t, link(1), Side::B, Role::Main, 2);
        // B has no lane yet: a flow from A's lane goes to B's main connection.
        let from_lane = t.route(link(1), 11).expect("lane holds A");
        assert_eq!(from_lane.side, Side::A);
        assert_eq!(from_lane.role, Role::Lane);
        assert_eq!(from_lane.peer, Some(2));
        attach(&mut t, link(1), Side::B, Role::Lane, 22);
        assert_eq!(t.route(link(1), 11).expect("lane").peer, Some(22));
        // A flow on a main connection stays off the lanes.
        let from_main = t.route(link(1), 1).expect("main holds A");
        assert_eq!((from_main.role, from_main.peer), (Role::Main, Some(2)));
        assert_eq!(t.route(link(1), 2).expect("B").peer, Some(1));
        assert_eq!(t.route(link(1), 99), None, "a stranger holds nothing");
        assert_eq!(t.route(link(2), 1), None, "no such link");
    }

    #[test]
    fn a_lane_is_superseded_and_detached_on_its_own() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        attach(&mut t, link(1), Side::A, Role::Lane, 11);
        let again = attach(&mut t, link(1), Side::A, Role::Lane, 12);
        assert_eq!(again.superseded, Some(11));
        assert_eq!(t.detach(link(1), Side::A, Role::Lane, 11), None);
        let gone = t.detach(link(1), Side::A, Role::Lane, 12).expect("held");
        assert_eq!(gone.peer, None, "a lane leaving tells nobody");
        assert!(t.holds(link(1), Side::A, 1), "the main attachment stays");
        // A lane alone keeps the link in the table.
        attach(&mut t, link(1), Side::A, Role::Lane, 13);
        t.detach(link(1), Side::A, Role::Main, 1).expect("held");
        assert_eq!(t.len(), 1);
        t.detach(link(1), Side::A, Role::Lane, 13).expect("held");
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_side_attached_from_a_new_connection_drops_its_lane_from_before() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        attach(&mut t, link(1), Side::B, Role::Main, 2);
        attach(&mut t, link(1), Side::B, Role::Lane, 3);
        // Side B restarted: its new main connection (4) comes before any
        // lane of its own; the old lane (3) would swallow A's lane flows.
        let back = attach(&mut t, link(1), Side::B, Role::Main, 4);
        assert_eq!((back.superseded, back.stale_lane), (Some(2), Some(3)));
        assert_eq!(t.peer(link(1), Side::A, Role::Lane), Some(4));
        assert_eq!(t.route(link(1), 3), None, "the old lane holds nothing");
        // Its new lane is kept when the side attaches again on the same
        // main connection (a retried attach).
        attach(&mut t, link(1), Side::B, Role::Lane, 5);
        let again = attach(&mut t, link(1), Side::B, Role::Main, 4);
        assert_eq!((again.superseded, again.stale_lane), (None, None));
        assert_eq!(t.peer(link(1), Side::A, Role::Lane), Some(5));
    }

    #[test]
    fn a_full_relay_refuses_new_links_but_not_known_ones() {
        let mut t = table();
        t.attach(link(1), Side::A, Role::Main, 1, 1, || 0)
            .expect("first link");
        assert_eq!(
            t.attach(link(2), Side::A, Role::Main, 2, 1, || 0),
            Err(Refusal::RelayFull)
        );
        t.attach(link(1), Side::B, Role::Main, 2, 1, || 0)
            .expect("a link already here is no new link");
        assert_eq!(t.data(link(2)), None);
    }

    #[test]
    fn parked_bytes_count_against_the_links_limit() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        let p = t.park(link(1)).expect("link here");
        assert!(t.room(p, 100, 1000));
        assert_eq!(t.hold(p, 60), 60);
        assert!(t.room(p, 100, 1000));
        // A read may pass the limit by what it read; then no more.
        assert_eq!(t.hold(p, 60), 120);
        assert_eq!(t.link_buffered(link(1)), 120);
        assert!(!t.room(p, 100, 1000), "over the link's buffer_limit");
        // A second flow of the same link shares the limit.
        let q = t.park(link(1)).expect("link here");
        assert!(!t.room(q, 100, 1000));
    }

    #[test]
    fn parked_bytes_count_against_the_relay_budget() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        attach(&mut t, link(2), Side::A, Role::Main, 2);
        let p = t.park(link(1)).expect("link 1");
        let q = t.park(link(2)).expect("link 2");
        t.hold(p, 500);
        assert!(t.room(q, 1000, 800), "under the budget");
        t.hold(q, 400);
        assert_eq!(t.buffered(), 900);
        assert!(!t.room(q, 1000, 800), "the budget is all links together");
        assert!(!t.room(p, 1000, 800));
        assert_eq!(t.unpark(p), (500, 400));
        assert!(t.room(q, 1000, 800), "released bytes make room");
    }

    #[test]
    fn a_zero_limit_refuses_every_byte() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        let p = t.park(link(1)).expect("link here");
        assert!(!t.room(p, 0, 1000));
        assert!(t.park(link(2)).is_none(), "no parking for a link not here");
    }

    #[test]
    fn unparking_releases_a_flows_bytes_once() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        let p = t.park(link(1)).expect("link here");
        let q = t.park(link(1)).expect("link here");
        t.hold(p, 10);
        t.hold(q, 5);
        assert_eq!(t.unpark(p), (10, 5));
        assert_eq!(t.unpark(p), (0, 5), "a second release does nothing");
        assert_eq!(t.link_buffered(link(1)), 5);
    }

    #[test]
    fn ending_a_link_releases_everything() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        attach(&mut t, link(1), Side::B, Role::Main, 2);
        attach(&mut t, link(1), Side::B, Role::Lane, 22);
        attach(&mut t, link(2), Side::A, Role::Main, 3);
        let p = t.park(link(1)).expect("link 1");
        let other = t.park(link(2)).expect("link 2");
        t.hold(p, 100);
        t.hold(other, 7);
        let ended = t.end(link(1)).expect("link here");
        assert_eq!(ended.conns, vec![1, 2, 22]);
        assert!(ended.was_paired);
        assert_eq!(ended.released, 100);
        assert_eq!(ended.data, 7);
        assert_eq!(t.buffered(), 7, "only the other link's bytes stay");
        assert_eq!(t.route(link(1), 1), None);
        assert!(
            !t.room(p, u64::MAX, u64::MAX),
            "the ended link's flow reads no more"
        );
        assert_eq!(t.hold(p, 5), 7, "nor holds more");
        assert_eq!(t.unpark(p), (0, 7));
        assert!(t.end(link(1)).is_none(), "ended once");
    }

    #[test]
    fn the_last_side_leaving_releases_parked_bytes() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        let p = t.park(link(1)).expect("link here");
        t.hold(p, 42);
        t.detach(link(1), Side::A, Role::Main, 1).expect("held");
        assert_eq!(t.buffered(), 0);
        // The link coming back starts from nothing; the old flow's late
        // release takes nothing from it.
        attach(&mut t, link(1), Side::A, Role::Main, 2);
        let q = t.park(link(1)).expect("link here");
        t.hold(q, 3);
        assert_eq!(t.unpark(p), (0, 3));
        assert_eq!(t.link_buffered(link(1)), 3);
    }

    #[test]
    fn draining_refuses_attaches_until_every_link_has_left() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        assert!(!t.is_drained());
        assert_eq!(t.drain(), 1);
        assert_eq!(
            t.attach(link(2), Side::A, Role::Main, 2, MANY, || 0),
            Err(Refusal::Draining)
        );
        assert_eq!(
            t.attach(link(1), Side::B, Role::Main, 2, MANY, || 0),
            Err(Refusal::Draining),
            "a link already here is refused too"
        );
        assert!(!t.is_drained());
        t.detach(link(1), Side::A, Role::Main, 1).expect("held");
        assert!(t.is_drained());
    }

    #[test]
    fn a_flow_parks_until_its_peer_attaches() {
        let mut t = table();
        attach(&mut t, link(1), Side::A, Role::Main, 1);
        let route = t.route(link(1), 1).expect("A holds it");
        assert_eq!(route.peer, None, "park: the peer is away");
        let p = t.park(link(1)).expect("link here");
        t.hold(p, 9);
        attach(&mut t, link(1), Side::B, Role::Main, 2);
        assert_eq!(t.peer(link(1), Side::A, route.role), Some(2));
        assert_eq!(t.buffered(), 9, "held until delivered");
        assert_eq!(t.unpark(p), (9, 0));
    }
}
