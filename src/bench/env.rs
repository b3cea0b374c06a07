//! A benchmark's private namespace and database, its worker processes, and cleanup.

use std::process::{Child, Command, Stdio};
use std::str::FromStr;

use crate::broker::{self, Topology};
use crate::config::Settings;
use crate::store::Store;

use super::BenchError;
use super::stats::{ProcessUsage, process_usage};

/// A namespace and database made for one benchmark.
#[derive(Debug)]
pub(super) struct BenchEnv {
    pub(super) settings: Settings,
    pub(super) store: Store,
    admin_url: String,
    database: String,
    workers: Vec<Child>,
}

impl BenchEnv {
    /// Creates the database (migrated) and picks a namespace.
    pub(super) async fn create(base: &Settings) -> Result<Self, BenchError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let database = format!("dagq_bench_{}", &id[..10]);
        tokio_postgres::Config::from_str(&base.database_url)
            .map_err(|e| BenchError::Setup(format!("DAGQ_DATABASE_URL: {e}")))?;
        let mut settings = base.clone();
        settings.namespace = format!("bench{}", &id[..10]);
        settings.database_url = with_dbname(&base.database_url, &database);
        Store::migrate(&settings.database_url).await?;
        let store = Store::connect(&settings.database_url, 8)?;
        Ok(BenchEnv {
            admin_url: with_dbname(&base.database_url, "postgres"),
            settings,
            store,
            database,
            workers: Vec::new(),
        })
    }

    /// Starts `count` worker processes of this binary, configured by `config_file`.
    pub(super) fn start_workers(
        &mut self,
        count: usize,
        concurrency: usize,
        config_file: &str,
    ) -> Result<(), BenchError> {
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::Setup(format!("cannot find this binary: {e}")))?;
        for _ in 0..count {
            let child = Command::new(&exe)
                .args([
                    "worker",
                    "--http",
                    "off",
                    "--no-migrate",
                    "--concurrency",
                    &concurrency.to_string(),
                ])
                .env("DAGQ_AMQP_URL", &self.settings.amqp_url)
                .env("DAGQ_DATABASE_URL", &self.settings.database_url)
                .env("DAGQ_NAMESPACE", &self.settings.namespace)
                .env("DAGQ_CONFIG", config_file)
                .env(
                    "DAGQ_LOG",
                    std::env::var("DAGQ_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| BenchError::Setup(format!("cannot start a worker: {e}")))?;
            self.workers.push(child);
        }
        Ok(())
    }

    /// Peak memory and CPU of each worker so far.
    pub(super) fn worker_usage(&self) -> Vec<ProcessUsage> {
        self.workers
            .iter()
            .filter_map(|w| process_usage(w.id()))
            .collect()
    }

    /// Stops the workers, deletes the namespace's queues and exchanges and the database.
    pub(super) async fn cleanup(mut self, task_queues: &[String]) {
        for worker in &mut self.workers {
            let _ = worker.kill();
            let _ = worker.wait();
        }
        // Our own connections first, so that dropping the database cuts none of them.
        self.store.close();
        if let Ok(connection) = broker::connect(&self.settings.amqp_url, "bench-cleanup").await {
            if let Ok(channel) = connection.create_channel().await {
                let _ = Topology::new(&self.settings.namespace)
                    .delete(&channel, task_queues)
                    .await;
                let _ = channel.close(200, "done".into()).await;
            }
            let _ = connection.close(200, "done".into()).await;
        }
        if let Ok((client, connection)) =
            tokio_postgres::connect(&self.admin_url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database);
            if let Err(e) = client.batch_execute(&drop).await {
                eprintln!("bench: could not drop database {}: {e}", self.database);
            }
        }
    }
}

/// `url` with its database name replaced.
fn with_dbname(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end);
    let host = path_start.map_or(base, |i| &base[..i]);
    match query {
        Some(q) => format!("{host}/{database}?{q}"),
        None => format!("{host}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_dbname;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            with_dbname("postgres://u@h:5432/dagq", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_dbname("postgres://u@h/dagq?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(
            with_dbname("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
    }
}
