//! Link status from the edge: what each agent reports of its half of every
//! link it holds, and the one status the controller makes of both halves.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{LinkId, RelayId};

/// `POST`: the state of every link half an agent holds
/// ([`AgentLinkStatus`]), in place of what it said before. Sent when
/// anything in it changes and every [`STATUS_REFRESH_SECS`] regardless.
pub const PATH_AGENT_LINK_STATUS: &str = "/v1/agent/link-status";

/// How often an agent reports its links' state even when nothing changed:
/// a report older than [`STATUS_STALE_SECS`] is not trusted.
pub const STATUS_REFRESH_SECS: u64 = 60;

/// How old an agent's last word may be before its halves are shown
/// `unknown` (two refreshes missed, and some slack).
pub const STATUS_STALE_SECS: u64 = 2 * STATUS_REFRESH_SECS + 30;

/// Most link halves in one [`AgentLinkStatus`].
pub const MAX_STATUS_LINKS: usize = 4096;

/// Longest reason in a [`HalfReport`], in bytes (an agent cuts a longer
/// one: a whole report stays well below the API's body limit).
pub const MAX_STATUS_REASON_LEN: usize = 512;

/// `POST PATH_AGENT_LINK_STATUS`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLinkStatus {
    /// Every link half the agent holds (at most [`MAX_STATUS_LINKS`]).
    pub links: Vec<HalfReport>,
    /// The agent's software version (at most
    /// [`super::MAX_VERSION_LEN`] bytes).
    #[serde(default)]
    pub version: Option<String>,
}

/// One link half as its agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HalfReport {
    /// The link.
    pub link_id: LinkId,
    /// Its state here.
    pub state: HalfState,
    /// Why, where it is not `ready` and the agent knows (at most
    /// [`MAX_STATUS_REASON_LEN`] bytes): the operating system's words for a
    /// listener that cannot bind, the last relay error while connecting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The relay the half is attached to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_id: Option<RelayId>,
}

/// What an agent reports of one half.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HalfState {
    /// Attached to a relay with an end-to-end session, the peer there.
    Ready,
    /// Attached to a relay; the peer is not (yet) there.
    Waiting,
    /// Not attached to any relay: connecting, or retrying after an error.
    Connecting,
    /// Its local end cannot be set up (a listener that cannot bind); the
    /// agent keeps trying.
    Failed,
}

impl HalfState {
    /// Its name as sent and stored.
    pub fn as_str(self) -> &'static str {
        LinkState::from(self).as_str()
    }
}

/// A state name that is none of [`HalfState`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a link half's state (ready, waiting, connecting or failed)")]
pub struct UnknownHalfState(String);

impl std::str::FromStr for HalfState {
    type Err = UnknownHalfState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Ready, Self::Waiting, Self::Connecting, Self::Failed]
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| UnknownHalfState(s.chars().take(32).collect()))
    }
}

/// A link's state (or one half's), as the operator sees it; the worst
/// comes last.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Both halves attached to one relay, end to end: it carries flows.
    Ready,
    /// A half is attached and waits for its peer.
    Waiting,
    /// A half is connecting to its relays.
    Connecting,
    /// A half's agent has not reported (yet, or for too long).
    #[default]
    Unknown,
    /// No healthy relay serves the link.
    Unplaced,
    /// A half cannot set up its local end.
    Failed,
    /// A half is outside its agent's consent: it is not served.
    Refused,
}

impl LinkState {
    /// Its name as shown and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Waiting => "waiting",
            Self::Connecting => "connecting",
            Self::Unknown => "unknown",
            Self::Unplaced => "unplaced",
            Self::Failed => "failed",
            Self::Refused => "refused",
        }
    }
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<HalfState> for LinkState {
    fn from(s: HalfState) -> Self {
        match s {
            HalfState::Ready => Self::Ready,
            HalfState::Waiting => Self::Waiting,
            HalfState::Connecting => Self::Connecting,
            HalfState::Failed => Self::Failed,
        }
    }
}

/// A link's status: its state, why, since when, and each half's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The worst of its halves' states (or `unplaced`).
    pub state: LinkState,
    /// Why, naming the agent, where it is not `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix time it has been in this state since, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The listening half (`from`) and the dialling one (`to`).
    #[serde(default)]
    pub halves: Vec<HalfStatus>,
}

/// One half's status, as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfStatus {
    /// The agent holding it.
    pub agent: String,
    /// `from` (listens) or `to` (dials the target).
    pub side: String,
    /// Its state.
    pub state: LinkState,
    /// Why, where it is not `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The relay it is attached to, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// Unix time it has been in this state since, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

impl LinkStatus {
    /// The status of a link made of `halves` (`from` first): the worst
    /// half's state with its reason, or `unplaced` where `placed` is false
    /// and no half is worse. A link is `ready` since its later half became
    /// so, and in any other state since the earliest half that is in it.
    pub fn combine(halves: Vec<HalfStatus>, placed: bool) -> Self {
        let worst = halves.iter().map(|h| h.state).max().unwrap_or_default();
        if !placed && worst < LinkState::Unplaced {
            return Self {
                state: LinkState::Unplaced,
                reason: Some("no healthy relay serves it".into()),
                since: None,
                halves,
            };
        }
        let in_state = halves.iter().filter(|h| h.state == worst);
        let since = match worst {
            LinkState::Ready => in_state.map(|h| h.since).max().flatten(),
            _ => in_state.filter_map(|h| h.since).min(),
        };
        let reason = halves
            .iter()
            .filter(|h| h.state == worst)
            .find_map(|h| Some(format!("{}: {}", h.agent, h.reason.as_deref()?)));
        Self {
            state: worst,
            reason,
            since,
            halves,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn half(side: &str, state: LinkState, reason: Option<&str>, since: u64) -> HalfStatus {
        HalfStatus {
            agent: format!("agent-{side}"),
            side: side.into(),
            state,
            reason: reason.map(Into::into),
            relay: None,
            since: Some(since),
        }
    }

    #[test]
    fn a_link_is_ready_when_both_halves_are_since_the_later() {
        let s = LinkStatus::combine(
            vec![
                half("from", LinkState::Ready, None, 10),
                half("to", LinkState::Ready, None, 20),
            ],
            true,
        );
        assert_eq!(
            (s.state, s.since, s.reason),
            (LinkState::Ready, Some(20), None)
        );
    }

    #[test]
    fn the_worst_half_names_the_state_and_why() {
        let s = LinkStatus::combine(
            vec![
                half(
                    "from",
                    LinkState::Failed,
                    Some("Address already in use"),
                    30,
                ),
                half("to", LinkState::Waiting, Some("peer not attached"), 10),
            ],
            true,
        );
        assert_eq!(s.state, LinkState::Failed);
        assert_eq!(s.since, Some(30));
        assert_eq!(
            s.reason.as_deref(),
            Some("agent-from: Address already in use")
        );
        // A refusal outranks everything, a missing relay all but the
        // halves' own failures.
        let s = LinkStatus::combine(
            vec![
                half("from", LinkState::Failed, Some("bind"), 30),
                half("to", LinkState::Refused, Some("consent"), 40),
            ],
            false,
        );
        assert_eq!(s.state, LinkState::Refused);
        let s = LinkStatus::combine(
            vec![
                half("from", LinkState::Connecting, None, 30),
                half("to", LinkState::Ready, None, 40),
            ],
            false,
        );
        assert_eq!((s.state, s.since), (LinkState::Unplaced, None));
    }

    #[test]
    fn no_halves_is_unknown() {
        assert_eq!(LinkStatus::combine(vec![], true).state, LinkState::Unknown);
    }

    #[test]
    fn states_read_as_they_are_shown() {
        for s in [
            LinkState::Ready,
            LinkState::Waiting,
            LinkState::Connecting,
            LinkState::Unknown,
            LinkState::Unplaced,
            LinkState::Failed,
            LinkState::Refused,
        ] {
            let json = serde_json::to_string(&s).expect("encodes");
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<LinkState>(&json).ok(), Some(s));
        }
        // An agent reports only its own states.
        assert!(serde_json::from_str::<HalfState>("\"refused\"").is_err());
        assert!("refused".parse::<HalfState>().is_err());
        for h in [
            HalfState::Ready,
            HalfState::Waiting,
            HalfState::Connecting,
            HalfState::Failed,
        ] {
            assert_eq!(h.as_str().parse::<HalfState>(), Ok(h));
        }
        let report: Result<AgentLinkStatus, _> = serde_json::from_str(
            r#"{"links":[{"link_id":"00000000000000000000000000000000","state":"ready","extra":1}]}"#,
        );
        assert!(report.is_err(), "unknown fields are refused");
    }
}
