//! `comsat ctl link …`: links as the operator writes and reads them, and
//! the rates they take.

use anyhow::{anyhow, bail};
use comsat_protocol::api;
use comsat_protocol::text::printable;

use super::{Output, ago, json, table};
use crate::client::Client;

fn link_rows(v: &[api::LinkInfo]) -> String {
    let rows = v
        .iter()
        .map(|l| {
            vec![
                l.spec.name.clone(),
                l.status.state.to_string(),
                format!("{} {}", l.spec.from, l.spec.listen),
                format!("{} {}", l.spec.to, l.spec.target),
                if l.relays.is_empty() {
                    "(none healthy)".into()
                } else {
                    l.relays.join(",")
                },
                l.spec
                    .max_flows
                    .map_or_else(|| "unlimited".into(), |n| n.to_string()),
                l.spec
                    .rate_limit_bytes_per_sec
                    .map_or_else(|| "unlimited".into(), format_rate),
                l.spec.connection.clone().unwrap_or_else(|| "shared".into()),
                l.generation.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "NAME",
            "STATUS",
            "FROM",
            "TO",
            "RELAYS",
            "MAX FLOWS",
            "RATE",
            "CONNECTION",
            "GEN",
        ],
        &rows,
    )
}

/// A rate that does not parse, and how to write one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateError {
    /// No number first.
    #[error("`{0}`: expected a number and a unit, like 10MiB/s or 100Mbit/s")]
    Number(String),
    /// A unit not known.
    #[error(
        "`{0}`: unknown unit `{1}` (use B, KB, KiB, MB, MiB, GB, GiB, kbit, Mbit or Gbit, per second)"
    )]
    Unit(String, String),
    /// Below 1 B/s or above 10^18 B/s.
    #[error("`{0}`: out of range")]
    Range(String),
}

/// Parses a rate as operators write it: `10MiB/s`, `1.5MB/s`, `100Mbit/s`,
/// `512KiB`, or plain bytes per second (`65536`). Returns bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, RateError> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| RateError::Number(s.to_owned()))?;
    let factor: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" | "kB" => 1e3,
        "KiB" => 1024.0,
        "M" | "MB" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "G" | "GB" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "kbit" | "Kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        other => return Err(RateError::Unit(s.to_owned(), other.to_owned())),
    };
    let bytes = value * factor;
    if !(1.0..=1e18).contains(&bytes) {
        return Err(RateError::Range(s.to_owned()));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes per second in binary units (`10 MiB/s`).
pub fn format_rate(r: u64) -> String {
    const UNITS: [&str; 4] = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
    let mut v = r as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round(), UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// `link create`.
pub async fn link_create(c: &Client, body: api::LinkSpec, out: Output) -> anyhow::Result<String> {
    if !api::valid_name(&body.name) {
        bail!(
            "link name `{}`: use 1 to {} lowercase letters, digits and `-`",
            body.name,
            api::MAX_NAME_LEN
        );
    }
    let l: api::LinkInfo = c.post(api::PATH_LINKS, &body, "link create").await?;
    if out == Output::Json {
        return json(&l);
    }
    Ok(link_rows(&[l]))
}

/// `link list`.
pub async fn link_list(c: &Client, out: Output) -> anyhow::Result<String> {
    let v: Vec<api::LinkInfo> = c.get(api::PATH_LINKS, &[], "link list").await?;
    if out == Output::Json {
        return json(&v);
    }
    Ok(link_rows(&v))
}

fn link_path(name: &str) -> anyhow::Result<String> {
    if !api::valid_name(name) {
        return Err(anyhow!(
            "link name `{name}`: use 1 to {} lowercase letters, digits and `-`",
            api::MAX_NAME_LEN
        ));
    }
    Ok(format!("{}/{name}", api::PATH_LINKS))
}

/// `link show`.
pub async fn link_show(c: &Client, name: &str, out: Output) -> anyhow::Result<String> {
    let l: api::LinkInfo = c.get(&link_path(name)?, &[], "link show").await?;
    show_link(&l, out)
}

/// `link update`: changes the limits relays enforce; open flows go on.
pub async fn link_update(
    c: &Client,
    name: &str,
    update: api::LinkUpdate,
    out: Output,
) -> anyhow::Result<String> {
    let body = update;
    let l: api::LinkInfo = c.patch(&link_path(name)?, &body, "link update").await?;
    show_link(&l, out)
}

fn show_link(l: &api::LinkInfo, out: Output) -> anyhow::Result<String> {
    if out == Output::Json {
        return json(l);
    }
    let mut refused = String::new();
    for r in &l.refused {
        // The reason is the agent's words: printed escaped.
        refused.push_str(&format!(
            "refused:    by {}: {}\n",
            r.agent,
            printable(&r.reason)
        ));
    }
    Ok(refused
        + &link_status(&l.status)
        + &format!(
            "name:       {}\nid:         {}\ngeneration: {}\nfrom:       {} listening on {}\nto:         {} dialling {}\nmax flows:  {}\nrate limit: {}\nconnection: {}\nrelays:     {}\n",
            l.spec.name,
            l.link_id,
            l.generation,
            l.spec.from,
            l.spec.listen,
            l.spec.to,
            l.spec.target,
            l.spec
                .max_flows
                .map_or_else(|| "unlimited".into(), |n| n.to_string()),
            l.spec.rate_limit_bytes_per_sec.map_or_else(
                || "unlimited".into(),
                |r| format!("{} per direction", format_rate(r))
            ),
            l.spec.connection.as_deref().map_or_else(
                || "shared with the agents' other links".into(),
                |c| format!("{c} (its own QUIC connection and thread on both agents)")
            ),
            if l.relays.is_empty() {
                "(none healthy yet)".into()
            } else {
                l.relays.join(", ")
            }
        )
        + &workloads(&l.spec)
        + &traffic(l))
}

/// The workloads a link admits and whether its service reads who called.
fn workloads(spec: &api::LinkSpec) -> String {
    let mut out = String::new();
    for rule in &spec.allow {
        out.push_str(&format!(
            "allow:      {}
",
            printable(rule)
        ));
    }
    if spec.proxy_protocol {
        out.push_str(
            "proxy:      PROXY v2 header naming the caller, to the target
",
        );
    }
    out
}

/// What the link carries, as a relay last reported it.
fn traffic(l: &api::LinkInfo) -> String {
    let Some(t) = &l.traffic else {
        return "traffic:    none reported yet\n".into();
    };
    format!(
        "traffic:    {} from {}, {} from {}; {} flows open; {} bytes and {} bytes in all (relay {}, {})\n",
        format_rate(t.bytes_per_sec_a_to_b),
        l.spec.from,
        format_rate(t.bytes_per_sec_b_to_a),
        l.spec.to,
        t.flows_open,
        t.bytes_a_to_b,
        t.bytes_b_to_a,
        printable(&t.relay),
        ago(Some(t.at))
    )
}

/// A link's status and each half's, as `link show` prints them (the
/// reasons are the agents' words: printed escaped).
fn link_status(s: &api::LinkStatus) -> String {
    let since = |t: Option<u64>| {
        t.map(|t| format!(" since {}", ago(Some(t))))
            .unwrap_or_default()
    };
    let mut out = format!("status:     {}{}", s.state, since(s.since));
    if let Some(reason) = &s.reason {
        out.push_str(&format!(": {}", printable(reason)));
    }
    out.push('\n');
    for h in &s.halves {
        out.push_str(&format!(
            "  {:<4}      {} {}{}",
            h.side,
            printable(&h.agent),
            h.state,
            since(h.since)
        ));
        if let Some(relay) = &h.relay {
            out.push_str(&format!(" on {}", printable(relay)));
        }
        if let Some(reason) = &h.reason {
            out.push_str(&format!(": {}", printable(reason)));
        }
        out.push('\n');
    }
    out
}

/// `link delete`.
pub async fn link_delete(c: &Client, name: &str) -> anyhow::Result<String> {
    c.delete(&link_path(name)?, "link delete").await?;
    Ok(format!("link {name} deleted\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, max_flows: Option<u32>) -> api::LinkInfo {
        api::LinkInfo {
            spec: api::LinkSpec {
                name: name.into(),
                from: "a".into(),
                listen: "tcp://127.0.0.1:7000".into(),
                to: "b".into(),
                target: "tcp://127.0.0.1:5432".into(),
                allowed_uids: vec![],
                allowed_gids: vec![],
                allow: vec![],
                proxy_protocol: false,
                max_flows,
                rate_limit_bytes_per_sec: max_flows.map(|_| 10 << 20),
                connection: max_flows.map(|_| "interactive".into()),
            },
            link_id: comsat_protocol::LinkId([7; 16]),
            generation: 2,
            relays: vec!["r1".into()],
            created_at: 0,
            refused: vec![],
            status: api::LinkStatus::default(),
            traffic: None,
        }
    }

    #[test]
    fn a_link_shows_its_status_and_each_half_with_why() -> anyhow::Result<()> {
        let mut l = info("db", None);
        let half = |side: &str, agent: &str, state, reason: Option<&str>| api::HalfStatus {
            agent: agent.into(),
            side: side.into(),
            state,
            reason: reason.map(Into::into),
            relay: Some("r1".into()),
            since: None,
        };
        l.status = api::LinkStatus::combine(
            vec![
                half(
                    "from",
                    "a",
                    api::LinkState::Failed,
                    Some(
                        "cannot listen on tcp://127.0.0.1:7000: Address already in use (os error 98)\n\u{1b}[2J",
                    ),
                ),
                half(
                    "to",
                    "b",
                    api::LinkState::Waiting,
                    Some("its peer is not attached to the relay"),
                ),
            ],
            true,
        );
        let shown = show_link(&l, Output::Table)?;
        assert!(
            shown.starts_with("status:     failed: a: cannot listen on tcp://127.0.0.1:7000: Address already in use (os error 98)\\n\\u{1b}[2J\n  from      a failed on r1: cannot listen"),
            "{shown}"
        );
        assert!(
            shown
                .contains("\n  to        b waiting on r1: its peer is not attached to the relay\n"),
            "{shown}"
        );
        let listed = link_rows(&[l]);
        assert!(listed.starts_with("NAME  STATUS  FROM"), "{listed}");
        assert!(
            listed.contains("\ndb    failed  a tcp://127.0.0.1:7000"),
            "{listed}"
        );
        Ok(())
    }

    #[test]
    fn a_refused_link_shows_who_refused_it_and_why() -> anyhow::Result<()> {
        let mut l = info("db", None);
        l.refused = vec![api::LinkRefused {
            agent: "b".into(),
            reason: "target tcp://10.0.0.1:5432 is outside this agent's consent\n\u{1b}[2J".into(),
            at: 1,
        }];
        let shown = show_link(&l, Output::Table)?;
        assert!(
            shown.starts_with("refused:    by b: target tcp://10.0.0.1:5432 is outside this agent's consent\\n\\u{1b}[2J\nstatus:     unknown\n"),
            "{shown}"
        );
        assert!(!show_link(&info("db", None), Output::Table)?.contains("refused"));
        Ok(())
    }

    #[test]
    fn links_show_their_flow_limit() -> anyhow::Result<()> {
        let rows = link_rows(&[info("db", Some(8)), info("free", None)]);
        let lines: Vec<&str> = rows.lines().collect();
        let col = lines[0].find("MAX FLOWS").expect("column");
        assert!(lines[0][col..].starts_with("MAX FLOWS  RATE"), "{rows}");
        assert!(lines[1][col..].starts_with("8 "), "{rows}");
        assert!(lines[1].contains(" 10 MiB/s "), "{rows}");
        assert!(lines[2][col..].starts_with("unlimited "), "{rows}");
        let conn = lines[0].find("CONNECTION").expect("column");
        assert!(lines[1][conn..].starts_with("interactive "), "{rows}");
        assert!(lines[2][conn..].starts_with("shared "), "{rows}");

        let shown = show_link(&info("db", Some(8)), Output::Table)?;
        assert!(shown.contains("\nmax flows:  8\n"), "{shown}");
        assert!(
            shown.contains("\nrate limit: 10 MiB/s per direction\n"),
            "{shown}"
        );
        assert!(
            shown.contains("\nconnection: interactive (its own QUIC connection"),
            "{shown}"
        );
        let shown = show_link(&info("db", None), Output::Table)?;
        assert!(shown.contains("\nmax flows:  unlimited\n"), "{shown}");
        assert!(
            shown.contains("\nconnection: shared with the agents' other links\n"),
            "{shown}"
        );
        let mut guarded = info("db", None);
        guarded.spec.allow = vec!["spiffe://e.org/app unix:uid:1000".into()];
        guarded.spec.proxy_protocol = true;
        let shown = show_link(&guarded, Output::Table)?;
        assert!(
            shown.contains("\nallow:      spiffe://e.org/app unix:uid:1000\nproxy:      PROXY v2"),
            "{shown}"
        );
        let json = show_link(&info("db", Some(8)), Output::Json)?;
        assert!(json.contains("\"max_flows\": 8"), "{json}");
        assert!(
            json.contains("\"rate_limit_bytes_per_sec\": 10485760"),
            "{json}"
        );
        Ok(())
    }

    #[test]
    fn rates_parse_as_operators_write_them() {
        assert_eq!(parse_rate("10MiB/s"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_rate("1.5MB/s"), Ok(1_500_000));
        assert_eq!(parse_rate("100Mbit/s"), Ok(12_500_000));
        assert_eq!(parse_rate("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_rate("65536"), Ok(65536));
        for bad in ["", "fast", "10 parsecs/s", "-1MB/s", "0", "1e30"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(format_rate(10 * 1024 * 1024), "10 MiB/s");
        assert_eq!(format_rate(1_500_000), "1.43 MiB/s");
        assert_eq!(format_rate(512), "512 B/s");
    }
}
