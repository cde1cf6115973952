//! The schema migrations: one set of files (`controller/migrations/`) for
//! both databases.
//!
//! Most migrations are plain SQL that both run. Where the two differ, a
//! line starting `--sqlite: ` is kept (without that prefix) for SQLite
//! only and a line starting `--postgres: ` for PostgreSQL only; every
//! other line is kept for both. The files stay valid SQL as they are.
//!
//! A released migration never changes: the migrator keeps each one's
//! checksum in the database and refuses to start on a database whose
//! history differs. A schema change is a new file.

use std::borrow::Cow;

use sqlx::AssertSqlSafe;
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use super::Backend;

/// Each migration: its version, its description and its template.
const MIGRATIONS: [(i64, &str, &str); 15] = [
    (1, "init", include_str!("../../../migrations/0001_init.sql")),
    (
        2,
        "link limits",
        include_str!("../../../migrations/0002_link_limits.sql"),
    ),
    (
        3,
        "link rate limit",
        include_str!("../../../migrations/0003_link_rate_limit.sql"),
    ),
    (
        4,
        "event seq",
        include_str!("../../../migrations/0004_event_seq.sql"),
    ),
    (
        5,
        "audit",
        include_str!("../../../migrations/0005_audit.sql"),
    ),
    (6, "rbac", include_str!("../../../migrations/0006_rbac.sql")),
    (
        7,
        "lanes",
        include_str!("../../../migrations/0007_lanes.sql"),
    ),
    (
        8,
        "link refusals",
        include_str!("../../../migrations/0008_link_refusals.sql"),
    ),
    (
        9,
        "peer moves",
        include_str!("../../../migrations/0009_peer_moves.sql"),
    ),
    (
        10,
        "link status",
        include_str!("../../../migrations/0010_link_status.sql"),
    ),
    (
        11,
        "console sessions",
        include_str!("../../../migrations/0011_console_sessions.sql"),
    ),
    (
        12,
        "traffic and versions",
        include_str!("../../../migrations/0012_traffic_and_versions.sql"),
    ),
    (
        13,
        "workload rules",
        include_str!("../../../migrations/0013_workload_rules.sql"),
    ),
    (
        14,
        "flow log",
        include_str!("../../../migrations/0014_flow_log.sql"),
    ),
    (
        15,
        "federation",
        include_str!("../../../migrations/0015_federation.sql"),
    ),
];

/// The migrator for `backend`'s database.
pub(super) fn migrator(backend: Backend) -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|&(version, description, template)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    AssertSqlSafe(render(template, backend)).into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// `template`'s SQL for `backend`.
fn render(template: &str, backend: Backend) -> String {
    let (mine, other) = match backend {
        Backend::Sqlite => ("--sqlite: ", "--postgres: "),
        Backend::Postgres => ("--postgres: ", "--sqlite: "),
    };
    template
        .split_inclusive('\n')
        .filter(|line| !line.starts_with(other))
        .map(|line| line.strip_prefix(mine).unwrap_or(line))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-384 of each released migration as each database has it, in
    /// order: what databases made by earlier releases hold.
    const RELEASED: [(&str, &str); 15] = [
        (
            "8a5ed74d7edaa043f65cba738a33406e9aadf28d5e25b5466d514952facfe8d7c42bf469371eba9797bec815b7cad112",
            "04b07fec1a7d34a6af53470ec77b693a09bbcc12e80489802d7e505689b88030048162c19e7c6ee2b930a5f76538c07c",
        ),
        (
            "9d9733898c885dd744bddc462778054feb876d18d80dda0276dcac4056b17e710c69838166a90cc220f54c4e78326718",
            "9d9733898c885dd744bddc462778054feb876d18d80dda0276dcac4056b17e710c69838166a90cc220f54c4e78326718",
        ),
        (
            "e6401bf05f03b8413ca9fda8bcbad817f567485ba3f5a17dc65f66217c41ed63375bd484bd5edc284935672095993683",
            "e6401bf05f03b8413ca9fda8bcbad817f567485ba3f5a17dc65f66217c41ed63375bd484bd5edc284935672095993683",
        ),
        (
            "3d853a9e4a9e17c1fd5fd63f0f42ccfecccf4688347380b0e2c5ebf4be559fc0389456a24beb692cb2b9bc501faa7665",
            "ab366031de2530675f7cb99391373854e1761654c2f0e744cdcca75d4246c7a66384ef86fd6564378805ddc083a63737",
        ),
        (
            "3d304536b0a37700c583be68943be0a878fa5c580acf7594e25b4dbd0cee4ad7d75b87b2ae08191bb343ef04a8d4457d",
            "3d304536b0a37700c583be68943be0a878fa5c580acf7594e25b4dbd0cee4ad7d75b87b2ae08191bb343ef04a8d4457d",
        ),
        (
            "c1f55d12c68b4e72f19165e360aa27f22f80d4e8e67f1e3fe02838b81673e32bef8fe908b566270e2b3340143daf9ae5",
            "c1f55d12c68b4e72f19165e360aa27f22f80d4e8e67f1e3fe02838b81673e32bef8fe908b566270e2b3340143daf9ae5",
        ),
        (
            "4a14d1c09653fc62948ca723244eeea43283648949bfda3a40f922400cfe02c019676662ee5f7fa7ac518cc9ed8bdf2f",
            "4a14d1c09653fc62948ca723244eeea43283648949bfda3a40f922400cfe02c019676662ee5f7fa7ac518cc9ed8bdf2f",
        ),
        (
            "80981625fd846fb1cab50ced6f7ccdc1c4577c5a221bc59d5989dbb62d357ab6332de2477f96eba8438cc35b92e1eb1c",
            "80981625fd846fb1cab50ced6f7ccdc1c4577c5a221bc59d5989dbb62d357ab6332de2477f96eba8438cc35b92e1eb1c",
        ),
        (
            "304312fdc4a92755f888093d6a8b6857ea56ec0c3159bf92b7855d7fc3437e93793f7db4cf69419e6f25d427d5c7b383",
            "304312fdc4a92755f888093d6a8b6857ea56ec0c3159bf92b7855d7fc3437e93793f7db4cf69419e6f25d427d5c7b383",
        ),
        (
            "a3faef2ce030753995e8ec5c6b3ba1b1790e526ade52e95f080c6a9c74bf26ac9cb793d748850c5471d737660d001307",
            "a3faef2ce030753995e8ec5c6b3ba1b1790e526ade52e95f080c6a9c74bf26ac9cb793d748850c5471d737660d001307",
        ),
        (
            "6d7e8e1c28c6680633b46555b2e8d548de740394e1c3a9e79b2bf41de49e8cc76e2d7f3e6cd0c84c50639ca6dc6da3c4",
            "6d7e8e1c28c6680633b46555b2e8d548de740394e1c3a9e79b2bf41de49e8cc76e2d7f3e6cd0c84c50639ca6dc6da3c4",
        ),
        (
            "25b5b1a37fff1837b2d36a243ba87d5b7b06bc46d14989c7cfad721ad8333a177ea482bebc4fb11c016099adfa15d443",
            "25b5b1a37fff1837b2d36a243ba87d5b7b06bc46d14989c7cfad721ad8333a177ea482bebc4fb11c016099adfa15d443",
        ),
        (
            "5446aea786af4ee99a00709eb1e567d4335607523862ca54f45198cdf114b4a902c0f4b7e5c4e8787a4a3225b61243fb",
            "5446aea786af4ee99a00709eb1e567d4335607523862ca54f45198cdf114b4a902c0f4b7e5c4e8787a4a3225b61243fb",
        ),
        (
            "777bdcc672912ceac1cb0760b4df61a8edcc7cc1a7f0a547b7a77b2c1f9cfe0d5092bfbe7fa0b063b5e2957c8482f355",
            "777bdcc672912ceac1cb0760b4df61a8edcc7cc1a7f0a547b7a77b2c1f9cfe0d5092bfbe7fa0b063b5e2957c8482f355",
        ),
        (
            "d937b6d0da33b96296a2a4b19aa4592664e63cc1051df425f5b450509b12b3bf268b9030a7e3c54da36c417fb9a79cdf",
            "d937b6d0da33b96296a2a4b19aa4592664e63cc1051df425f5b450509b12b3bf268b9030a7e3c54da36c417fb9a79cdf",
        ),
    ];

    #[test]
    fn released_migrations_are_what_existing_databases_hold() {
        for (backend, pick) in [(Backend::Sqlite, 0), (Backend::Postgres, 1)] {
            let migrator = migrator(backend);
            let have: Vec<_> = migrator.iter().collect();
            assert_eq!(have.len(), RELEASED.len());
            for (i, (m, released)) in have.iter().zip(RELEASED).enumerate() {
                assert_eq!(m.version, i as i64 + 1);
                let want = if pick == 0 { released.0 } else { released.1 };
                assert_eq!(
                    hex::encode(&*m.checksum),
                    want,
                    "migration {} for {backend:?} differs from the released one: \
                     add a new migration instead",
                    m.version
                );
            }
        }
    }

    #[test]
    fn dialect_lines_reach_only_their_database() {
        let t = "a\n--sqlite: s INTEGER\n--postgres: p BIGINT\n-- both\nb";
        assert_eq!(render(t, Backend::Sqlite), "a\ns INTEGER\n-- both\nb");
        assert_eq!(render(t, Backend::Postgres), "a\np BIGINT\n-- both\nb");
        for (_, _, template) in MIGRATIONS {
            for backend in [Backend::Sqlite, Backend::Postgres] {
                let sql = render(template, backend);
                assert!(!sql.contains("--sqlite:") && !sql.contains("--postgres:"));
            }
        }
    }
}
