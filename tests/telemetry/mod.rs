//! Helpers of the observability tests: in-process workers serving HTTP on a free
//! loopback port, a parser of the Prometheus text format, and a TCP proxy in front of
//! RabbitMQ that a test can cut and restore.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dagq::config::Settings;
use dagq::engine::{Worker, WorkerOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::common::WorkerHandle;

/// An in-process worker serving `/metrics`, `/healthz` and `/readyz`.
pub struct HttpWorker {
    pub addr: SocketAddr,
    worker: WorkerHandle,
    client: reqwest::Client,
}

impl HttpWorker {
    /// Starts a worker with fast queue refresh and backlog polling; `options` sets the
    /// rest (queues, concurrency).
    pub async fn start(settings: &Settings, options: WorkerOptions) -> HttpWorker {
        let options = WorkerOptions {
            http: Some("127.0.0.1:0".parse().expect("a literal address")),
            migrate: false,
            queue_refresh: Duration::from_millis(200),
            backlog_interval: Duration::from_millis(200),
            ..options
        };
        let mut worker = Worker::new(settings.clone(), options);
        let addr = worker
            .bind_http()
            .await
            .expect("a free loopback port binds")
            .expect("the worker serves HTTP");
        let worker = WorkerHandle::spawn(worker);
        // Loopback only: never through a proxy from the environment.
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client builds");
        HttpWorker {
            addr,
            worker,
            client,
        }
    }

    /// GETs `path`; (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.expect("body reads"))
    }

    /// Scrapes `/metrics`.
    pub async fn scrape(&self) -> Metrics {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "/metrics answers");
        Metrics::parse(&body)
    }

    /// Stops the worker and waits for it.
    pub async fn stop(self) {
        self.worker.stop().await;
    }
}

/// One sample of the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the Prometheus text format (as dagq writes it: no escaped quotes).
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("sample line: {line}"));
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, value) = pair
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("label in {line}"));
                        (key.to_owned(), value.trim_end_matches('"').to_owned())
                    })
                    .collect();
                let value = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
                Sample {
                    name: name.to_owned(),
                    labels,
                    value,
                }
            })
            .collect();
        Metrics { samples }
    }

    /// The sum of the samples of `name` whose labels include `labels`; `None` when
    /// there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Whether any sample's name starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.samples.iter().any(|s| s.name.starts_with(prefix))
    }
}

/// An expected sample value.
pub type Expected<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// Scrapes `worker` until every expectation holds; after `timeout`, fails listing each
/// figure that differs.
pub async fn expect_metrics(
    worker: &HttpWorker,
    expected: &[Expected<'_>],
    timeout: Duration,
) -> Metrics {
    let deadline = Instant::now() + timeout;
    loop {
        let metrics = worker.scrape().await;
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(name, labels, want)| {
                let got = metrics.value(name, labels);
                (got != Some(*want))
                    .then(|| format!("{name}{labels:?}: expected {want}, got {got:?}"))
            })
            .collect();
        if wrong.is_empty() {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "after {timeout:?}, metrics differ:\n{}",
            wrong.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP proxy on loopback in front of RabbitMQ, cut and restored on the same port.
pub struct BrokerProxy {
    pub addr: SocketAddr,
    upstream: String,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

impl BrokerProxy {
    /// Proxies a free loopback port to `upstream` (host:port).
    pub async fn start(upstream: String) -> BrokerProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port binds");
        let addr = listener.local_addr().expect("bound");
        let running = Some(serve(listener, upstream.clone()));
        BrokerProxy {
            addr,
            upstream,
            running,
        }
    }

    /// Stops accepting and drops every proxied connection.
    pub async fn cut(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            stop.cancel();
            task.await.expect("proxy task did not panic");
        }
    }

    /// Accepts again on the same port.
    pub async fn restore(&mut self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("the proxy's port binds again");
        self.running = Some(serve(listener, self.upstream.clone()));
    }
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.running {
            stop.cancel();
        }
    }
}

fn serve(listener: TcpListener, upstream: String) -> (CancellationToken, JoinHandle<()>) {
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped.cancelled() => break,
                accepted = listener.accept() => {
                    let Ok((mut inbound, _)) = accepted else { continue };
                    let upstream = upstream.clone();
                    connections.spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }
        }
        // Aborting drops both ends of every connection; the listener goes with the task.
        connections.shutdown().await;
    });
    (stop, task)
}

/// host:port of the broker that `settings` point at.
pub fn broker_address(settings: &Settings) -> String {
    let url = reqwest::Url::parse(&settings.amqp_url).expect("DAGQ_AMQP_URL parses");
    format!(
        "{}:{}",
        url.host_str().expect("the AMQP URL names a host"),
        url.port().unwrap_or(5672)
    )
}

/// `settings` with the AMQP URL pointed at `addr`.
pub fn through_proxy(settings: &Settings, addr: SocketAddr) -> Settings {
    let mut url = reqwest::Url::parse(&settings.amqp_url).expect("DAGQ_AMQP_URL parses");
    url.set_host(Some(&addr.ip().to_string()))
        .expect("an AMQP URL takes a host");
    url.set_port(Some(addr.port()))
        .expect("an AMQP URL takes a port");
    let mut settings = settings.clone();
    settings.amqp_url = url.to_string();
    settings
}
