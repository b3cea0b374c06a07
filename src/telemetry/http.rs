//! The HTTP endpoints every worker serves: `/metrics` (its own metrics, plus the backlog
//! gauges while it is the elected poller), `/healthz` (the process answers) and `/readyz`
//! (broker and database reachable).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{BacklogExport, metrics_handle};

/// How often histogram samples are folded into their buckets when nobody scrapes, so
/// that an unscraped worker's memory stays flat.
const UPKEEP: Duration = Duration::from_secs(5);

/// Answers whether the worker can do its job (broker and database reachable).
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready, otherwise what is missing.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
}

struct Endpoints<R> {
    readiness: Arc<R>,
    metrics: PrometheusHandle,
    backlog: BacklogExport,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`; returns
/// the address it serves on.
pub async fn serve_http<R: Readiness>(
    listener: TcpListener,
    readiness: Arc<R>,
    backlog: BacklogExport,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let metrics = metrics_handle();
    let upkeep = metrics.clone();
    let state = Arc::new(Endpoints {
        readiness,
        metrics,
        backlog,
    });
    let app = Router::new()
        .route("/metrics", get(render_metrics::<R>))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route("/readyz", get(readyz::<R>))
        .with_state(state);
    let bound = listener.local_addr()?;
    let stop_upkeep = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tokio::select! {
                _ = stop_upkeep.cancelled() => return,
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

async fn render_metrics<R: Readiness>(
    State(endpoints): State<Arc<Endpoints<R>>>,
) -> impl IntoResponse {
    let mut body = endpoints.metrics.render();
    endpoints.backlog.render_into(&mut body);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn readyz<R: Readiness>(State(endpoints): State<Arc<Endpoints<R>>>) -> (StatusCode, String) {
    match endpoints.readiness.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
