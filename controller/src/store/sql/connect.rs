//! Opening a database: the SQLite file or a PostgreSQL server, with the
//! embedded migrations, and write transactions.

use std::path::Path;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{Any, ConnectOptions, Executor, Transaction};

use super::{Backend, SqlStore};
use crate::store::StoreError;

/// How long a connection waits for a lock another holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl SqlStore {
    /// Opens (creating if missing) the SQLite database file and applies
    /// the embedded migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let url = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .to_url_lossy();
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(sqlx::AssertSqlSafe(format!(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {};",
                        BUSY_TIMEOUT.as_millis()
                    )))
                    .await?;
                    Ok(())
                })
            })
            .connect(url.as_str())
            .await?;
        super::migrations::migrator(Backend::Sqlite)
            .run(&pool)
            .await?;
        Ok(Self {
            pool,
            backend: Backend::Sqlite,
        })
    }

    /// Connects to a PostgreSQL database (`postgres://user:pass@host/db`)
    /// and applies the embedded migrations (several controllers may start
    /// at once: the migrator takes a lock).
    ///
    /// Over TLS as the URL's `sslmode` says: with `verify-full` the
    /// server's certificate must chain to `sslrootcert` (or the system's
    /// roots) and name the URL's host, or the connection is refused with
    /// [`StoreError::DbTls`].
    pub async fn connect_postgres(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| match tls_refusal(&e) {
                Some(why) => StoreError::DbTls(why),
                None => StoreError::Db(e),
            })?;
        super::migrations::migrator(Backend::Postgres)
            .run(&pool)
            .await?;
        Ok(Self {
            pool,
            backend: Backend::Postgres,
        })
    }

    /// Whether the database already holds a controller (an admin token).
    pub async fn holds_a_controller(&self) -> Result<bool, StoreError> {
        Ok(sqlx::query("SELECT 1 FROM api_tokens LIMIT 1")
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    pub(super) async fn write_tx(&self) -> Result<Transaction<'static, Any>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }
}

/// Why TLS to the database failed, if that is what `e` is (sqlx reports a
/// refused certificate as an I/O error holding rustls's).
fn tls_refusal(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Tls(e) => Some(error_chain(&**e)),
        sqlx::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(ToString::to_string),
        _ => None,
    }
}

/// An error and its sources, joined by ": ".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
