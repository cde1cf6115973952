//! The flow log: every flow's start and end at both agents, who called,
//! and how much it carried; agents report their records to the
//! controller, which keeps them for a while and answers queries.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{LinkId, RelayId, Side};
use crate::workload;

/// `POST`: an agent's flow records ([`AgentFlows`]) → [`super::Empty`].
pub const PATH_AGENT_FLOWS: &str = "/v1/agent/flows";

/// `GET ?link=NAME&identity=ID&since=S&until=U&limit=N`: the flow log
/// (permission `flows` `list`), newest first → `Vec<`[`FlowInfo`]`>`.
pub const PATH_FLOWS: &str = "/v1/flows";

/// Most records in one [`AgentFlows`].
pub const MAX_FLOWS_PER_REPORT: usize = 1000;

/// Most records one query answers.
pub const MAX_FLOWS_PER_QUERY: usize = 10_000;

/// How a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowOutcome {
    /// Both directions finished (each side half-closed and was
    /// acknowledged).
    Completed,
    /// Reset: by an application, the peer, a target that could not be
    /// reached, or an outage longer than the flow timeout.
    Reset,
    /// Refused before it started: no allow rule admits its caller.
    Refused,
}

impl FlowOutcome {
    /// Its name, as the log and the API write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Reset => "reset",
            Self::Refused => "refused",
        }
    }
}

impl fmt::Display for FlowOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One flow as one of its agents saw it, when it ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRecord {
    /// The link.
    pub link_id: LinkId,
    /// The flow's id on the link.
    pub flow_id: u32,
    /// The side of the agent that reports it: `a` listens (its local
    /// connection is the caller), `b` dials the target.
    pub side: Side,
    /// The caller's SPIFFE ID, where the rule that admitted it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_id: Option<String>,
    /// The caller's selectors (at most
    /// [`workload::MAX_CALLER_SELECTORS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caller: Vec<String>,
    /// The relay that carried it last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_id: Option<RelayId>,
    /// Unix time, in milliseconds, the flow started here.
    pub started_ms: u64,
    /// Unix time, in milliseconds, it ended here.
    pub ended_ms: u64,
    /// Bytes this agent read from its local connection and sent.
    pub bytes_sent: u64,
    /// Bytes this agent wrote to its local connection.
    pub bytes_received: u64,
    /// How it ended.
    pub outcome: FlowOutcome,
}

impl FlowRecord {
    /// Checks what an agent reported: a valid SPIFFE ID and selectors
    /// within the limits, and an end not before its start.
    pub fn check(&self) -> Result<(), String> {
        if let Some(id) = &self.caller_id {
            workload::check_spiffe_id(id).map_err(|e| format!("caller_id: {e}"))?;
        }
        if self.caller.len() > workload::MAX_CALLER_SELECTORS {
            return Err(format!(
                "more than {} caller selectors",
                workload::MAX_CALLER_SELECTORS
            ));
        }
        for s in &self.caller {
            workload::Selector::parse(s).map_err(|e| format!("caller selector: {e}"))?;
        }
        if self.ended_ms < self.started_ms {
            return Err("ended_ms before started_ms".into());
        }
        Ok(())
    }
}

/// `POST PATH_AGENT_FLOWS`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFlows {
    /// Flows that ended (at most [`MAX_FLOWS_PER_REPORT`]).
    pub flows: Vec<FlowRecord>,
    /// Records this agent dropped since its last report because the
    /// controller took them too slowly (its queue holds at most
    /// 10,000).
    #[serde(default)]
    pub dropped: u64,
}

/// A flow record as the controller answers it: with names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowInfo {
    /// The link's name (its id if it was deleted since).
    pub link: String,
    /// The agent that reported it.
    pub agent: String,
    /// The record.
    #[serde(flatten)]
    pub record: FlowRecord,
    /// The relay's name, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> FlowRecord {
        FlowRecord {
            link_id: LinkId([1; 16]),
            flow_id: 7,
            side: Side::A,
            caller_id: Some("spiffe://example.org/app".into()),
            caller: vec!["unix:uid:1000".into()],
            relay_id: None,
            started_ms: 1,
            ended_ms: 2,
            bytes_sent: 3,
            bytes_received: 4,
            outcome: FlowOutcome::Completed,
        }
    }

    #[test]
    fn records_are_checked() {
        assert_eq!(record().check(), Ok(()));
        let mut bad = record();
        bad.caller_id = Some("spiffe://Bad/x".into());
        assert!(bad.check().is_err());
        let mut bad = record();
        bad.caller = vec!["nope".into()];
        assert!(bad.check().is_err());
        let mut bad = record();
        bad.ended_ms = 0;
        assert!(bad.check().is_err());
        let mut bad = record();
        bad.caller = vec![format!("unix:path:/{}", "x".repeat(2000))];
        assert!(bad.check().is_err(), "a selector over its length limit");
        let json = serde_json::to_string(&record()).expect("json");
        assert!(json.contains("\"outcome\":\"completed\""), "{json}");
        let back: FlowRecord = serde_json::from_str(&json).expect("back");
        assert_eq!(back, record());
    }
}
