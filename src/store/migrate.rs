//! Forward-only migrations from `sql/`, embedded at build time and applied in order under
//! an advisory lock, so that several workers starting at once apply each exactly once.

use std::str::FromStr;

use tokio_postgres::NoTls;

use super::{Store, StoreError};

/// (version, name, SQL), in the order they apply.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "0001_core", include_str!("../../sql/0001_core.sql")),
    (
        2,
        "0002_model_calls",
        include_str!("../../sql/0002_model_calls.sql"),
    ),
    (
        3,
        "0003_retries",
        include_str!("../../sql/0003_retries.sql"),
    ),
    (
        4,
        "0004_dead_letters_incidents",
        include_str!("../../sql/0004_dead_letters_incidents.sql"),
    ),
];

/// Arbitrary constant that identifies dagq's migration lock among advisory locks.
const MIGRATION_LOCK: i64 = 0x0064_6167_716d_6967;

/// Connects to the server's `postgres` database and creates the target database when it
/// does not exist. Two processes racing to create it is harmless.
pub(super) async fn create_database_if_missing(url: &str) -> Result<(), StoreError> {
    let config =
        tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Url(e.to_string()))?;
    let name = config
        .get_dbname()
        .ok_or_else(|| StoreError::Url("the URL names no database (…/dagq)".into()))?
        .to_owned();
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
        {
            Ok(()) => tracing::info!(database = %name, "created database"),
            // 42P04 duplicate_database, 23505: another process created it first.
            Err(e)
                if e.code()
                    .is_some_and(|c| c.code() == "42P04" || c.code() == "23505") => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// Applies every migration not yet recorded; returns the names applied now.
pub(super) async fn apply(store: &Store) -> Result<Vec<String>, StoreError> {
    let mut client = store.client().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        applied.push((*name).to_owned());
    }
    tx.commit().await?;
    Ok(applied)
}
