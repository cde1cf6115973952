//! `comsat ctl audit` and `comsat ctl flows`: the controller's logs.

use comsat_protocol::api;

use super::{Output, json, table};
use crate::client::Client;

/// `comsat ctl audit`.
#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// List audit records, oldest first (at most 1000, the newest).
    List {
        /// Only records newer than this, e.g. 10m, 1h, 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only this subject, or subjects starting with it (`agent:`).
        #[arg(long)]
        subject: Option<String>,
        /// Only records of this outcome: ok, denied or alarm.
        #[arg(long, value_parser = ["ok", "denied", "alarm"])]
        result: Option<String>,
        /// At most this many records.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

/// Runs `comsat ctl audit COMMAND`.
pub async fn audit(c: &Client, command: AuditCommand, out: Output) -> anyhow::Result<String> {
    let AuditCommand::List {
        since,
        subject,
        result,
        limit,
    } = command;
    audit_list(c, since, (subject, result), limit, out).await
}

/// `comsat ctl flows`: the flow log, the latest ended first.
#[derive(clap::Args, Debug)]
pub struct FlowsArgs {
    /// Only this link's flows.
    #[arg(long)]
    link: Option<String>,
    /// Only flows whose caller has this SPIFFE ID or selector (like
    /// unix:uid:1000).
    #[arg(long)]
    identity: Option<String>,
    /// Only flows that ended within this long, e.g. 10m, 1h, 7d.
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<std::time::Duration>,
    /// Only flows that ended longer ago than this.
    #[arg(long, value_parser = humantime::parse_duration)]
    until: Option<std::time::Duration>,
    /// At most this many records (at most 10000).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// One JSON object a line (JSON Lines), for export.
    #[arg(long)]
    jsonl: bool,
}

/// Unix milliseconds `ago` before now.
fn ms_ago(ago: std::time::Duration) -> u64 {
    std::time::SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs `comsat ctl flows`.
pub async fn flows(c: &Client, a: FlowsArgs, out: Output) -> anyhow::Result<String> {
    let mut query = vec![("limit", a.limit.to_string())];
    for (key, value) in [("link", a.link), ("identity", a.identity)] {
        if let Some(v) = value {
            query.push((key, v));
        }
    }
    if let Some(d) = a.since {
        query.push(("since", ms_ago(d).to_string()));
    }
    if let Some(d) = a.until {
        query.push(("until", ms_ago(d).to_string()));
    }
    let v: Vec<api::FlowInfo> = c.get(api::PATH_FLOWS, &query, "flows").await?;
    if a.jsonl {
        let mut lines = String::new();
        for f in &v {
            lines.push_str(&serde_json::to_string(f)?);
            lines.push('\n');
        }
        return Ok(lines);
    }
    if out == Output::Json {
        return json(&v);
    }
    Ok(flow_rows(&v))
}

fn flow_rows(v: &[api::FlowInfo]) -> String {
    let rows = v
        .iter()
        .map(|f| {
            let r = &f.record;
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.ended_ms);
            vec![
                humantime::format_rfc3339_millis(at).to_string(),
                f.link.clone(),
                format!("{} {}", r.side, f.agent),
                r.flow_id.to_string(),
                r.caller_id.clone().unwrap_or_else(|| "-".into()),
                if r.caller.is_empty() {
                    "-".into()
                } else {
                    r.caller.join(" ")
                },
                r.bytes_sent.to_string(),
                r.bytes_received.to_string(),
                format!("{} ms", r.ended_ms.saturating_sub(r.started_ms)),
                r.outcome.to_string(),
                f.relay.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "ENDED",
            "LINK",
            "AGENT",
            "FLOW",
            "CALLER ID",
            "CALLER",
            "SENT",
            "RECEIVED",
            "TOOK",
            "OUTCOME",
            "RELAY",
        ],
        &rows,
    )
}

/// `audit list`.
async fn audit_list(
    c: &Client,
    since: Option<std::time::Duration>,
    (subject, result): (Option<String>, Option<String>),
    limit: usize,
    out: Output,
) -> anyhow::Result<String> {
    let mut query = vec![("limit", limit.to_string())];
    if let Some(d) = since {
        let from = std::time::SystemTime::now()
            .checked_sub(d)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        query.push(("since", from.to_string()));
    }
    if let Some(s) = subject {
        query.push(("subject", s));
    }
    if let Some(r) = result {
        query.push(("result", r));
    }
    let v: Vec<api::AuditRecord> = c.get(api::PATH_AUDIT, &query, "audit list").await?;
    if out == Output::Json {
        return json(&v);
    }
    let rows = v
        .iter()
        .map(|r| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.at_ms);
            vec![
                humantime::format_rfc3339_seconds(at).to_string(),
                r.subject.clone(),
                r.action.clone(),
                r.resource.clone(),
                r.result.clone(),
                r.reason.clone().unwrap_or_default(),
                r.source.clone().unwrap_or_default(),
            ]
        })
        .collect::<Vec<_>>();
    Ok(table(
        &[
            "TIME", "SUBJECT", "ACTION", "RESOURCE", "RESULT", "REASON", "SOURCE",
        ],
        &rows,
    ))
}
