//! Test databases: a temporary SQLite file, or a fresh PostgreSQL database
//! on the server `COMSAT_TEST_POSTGRES_URL` names.

#![allow(dead_code, unreachable_pub)]

pub mod api;

use comsat_controller::store::SqlStore;
use comsat_controller::store::testing::{fresh_database, postgres_server};

/// A database for one test.
pub enum Db {
    Sqlite(tempfile::TempDir),
    /// The URL of a database created for this test.
    Postgres(String),
}

impl Db {
    pub fn sqlite() -> Self {
        Self::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    /// A fresh database on the test server, or `None` (with the reason
    /// printed) when none is configured.
    pub async fn postgres() -> Option<Self> {
        let admin = postgres_server()?;
        Some(Self::Postgres(
            fresh_database(&admin)
                .await
                .expect("create a database on the PostgreSQL test server"),
        ))
    }

    pub async fn open(&self) -> SqlStore {
        match self {
            Self::Sqlite(dir) => SqlStore::open(&dir.path().join("controller.db"))
                .await
                .expect("open SQLite store"),
            Self::Postgres(url) => SqlStore::connect_postgres(url)
                .await
                .expect("open PostgreSQL store"),
        }
    }
}
