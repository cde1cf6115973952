//! Between rows and records: number conversions, parsing what a row
//! holds (a value that does not parse is a corrupt row), and the queries
//! that read nodes and links.

use std::str::FromStr;

use comsat_protocol::RelayId;
use comsat_protocol::api::RelayLoad;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::SqlStore;
use crate::store::{LinkRecord, NodeRecord, StoreError};

pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

pub(super) fn parse<T: FromStr>(what: &str, s: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| corrupt(what, e))
}

pub(super) fn json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt(what, e))
}

pub(super) fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| corrupt("encoding json", e))
}

const NODE_COLUMNS: &str = "node_id, kind, name, sign_pub, noise_pub, public_addr, created_at, \
     last_seen, last_heartbeat, load, config_version, interactive_addr, spiffe_id";

pub(super) fn node_from_row(row: &AnyRow) -> Result<NodeRecord, StoreError> {
    let load: Option<String> = row.try_get("load")?;
    let noise: Option<String> = row.try_get("noise_pub")?;
    Ok(NodeRecord {
        node_id: parse("nodes.node_id", &row.try_get::<String, _>("node_id")?)?,
        kind: parse("nodes.kind", &row.try_get::<String, _>("kind")?)?,
        name: row.try_get("name")?,
        sign_pub: parse("nodes.sign_pub", &row.try_get::<String, _>("sign_pub")?)?,
        noise_pub: noise.map(|n| parse("nodes.noise_pub", &n)).transpose()?,
        public_addr: row.try_get("public_addr")?,
        interactive_addr: row.try_get("interactive_addr")?,
        spiffe_id: row.try_get("spiffe_id")?,
        created_at: to_u64(row.try_get("created_at")?),
        last_seen: row.try_get::<Option<i64>, _>("last_seen")?.map(to_u64),
        last_heartbeat: row.try_get::<Option<i64>, _>("last_heartbeat")?.map(to_u64),
        load: load
            .map(|l| json::<RelayLoad>("nodes.load", &l))
            .transpose()?
            .unwrap_or_default(),
        config_version: to_u64(row.try_get("config_version")?),
    })
}

pub(super) const LINK_COLUMNS: &str = "link_id, name, generation, from_node, listen, to_node, target, \
     allowed_uids, allowed_gids, relays, created_at, grant_not_after, max_flows, rate_limit, connection, \
     allow_rules, proxy_protocol";

pub(super) fn link_from_row(row: &AnyRow) -> Result<LinkRecord, StoreError> {
    let relays: Vec<String> = json("links.relays", &row.try_get::<String, _>("relays")?)?;
    Ok(LinkRecord {
        link_id: parse("links.link_id", &row.try_get::<String, _>("link_id")?)?,
        name: row.try_get("name")?,
        generation: to_u64(row.try_get("generation")?),
        from_node: parse("links.from_node", &row.try_get::<String, _>("from_node")?)?,
        listen: row.try_get("listen")?,
        to_node: parse("links.to_node", &row.try_get::<String, _>("to_node")?)?,
        target: row.try_get("target")?,
        allowed_uids: json(
            "links.allowed_uids",
            &row.try_get::<String, _>("allowed_uids")?,
        )?,
        allowed_gids: json(
            "links.allowed_gids",
            &row.try_get::<String, _>("allowed_gids")?,
        )?,
        allow: json(
            "links.allow_rules",
            &row.try_get::<String, _>("allow_rules")?,
        )?,
        proxy_protocol: row.try_get::<i64, _>("proxy_protocol")? != 0,
        relays: relays
            .iter()
            .map(|r| parse::<RelayId>("links.relays", r))
            .collect::<Result<_, _>>()?,
        created_at: to_u64(row.try_get("created_at")?),
        grant_not_after: to_u64(row.try_get("grant_not_after")?),
        max_flows: row
            .try_get::<Option<i64>, _>("max_flows")?
            .and_then(|n| u32::try_from(n).ok()),
        rate_limit: row
            .try_get::<Option<i64>, _>("rate_limit")?
            .and_then(|n| u64::try_from(n).ok()),
        connection: row.try_get("connection")?,
    })
}

pub(super) fn relays_json(relays: &[RelayId]) -> Result<String, StoreError> {
    to_json(&relays.iter().map(ToString::to_string).collect::<Vec<_>>())
}

/// Records of one kind as the database holds them: the table, its
/// columns, and how a row becomes a record.
pub(super) struct Table<T> {
    name: &'static str,
    columns: &'static str,
    from_row: fn(&AnyRow) -> Result<T, StoreError>,
}

/// Enrolled nodes.
pub(super) const NODES: Table<NodeRecord> = Table {
    name: "nodes",
    columns: NODE_COLUMNS,
    from_row: node_from_row,
};

/// Links.
pub(super) const LINKS: Table<LinkRecord> = Table {
    name: "links",
    columns: LINK_COLUMNS,
    from_row: link_from_row,
};

impl SqlStore {
    /// The records `SELECT … FROM {table} {tail}` finds (`tail`: a `WHERE`
    /// and `ORDER BY`, with `$1`, `$2`, … bound to `args` in order).
    pub(super) async fn select<T>(
        &self,
        table: &Table<T>,
        tail: &str,
        args: &[&str],
    ) -> Result<Vec<T>, StoreError> {
        let sql = format!("SELECT {} FROM {} {tail}", table.columns, table.name);
        let query = args
            .iter()
            .fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |q, a| q.bind(*a));
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(table.from_row)
            .collect()
    }

    /// The one record `SELECT … FROM {table} {tail}` finds by its key.
    pub(super) async fn select_one<T>(
        &self,
        table: &Table<T>,
        tail: &str,
        args: &[&str],
    ) -> Result<Option<T>, StoreError> {
        Ok(self.select(table, tail, args).await?.into_iter().next())
    }
}
