//! Processing deliveries and settling them with the broker: ack after the outcome is
//! durable, requeue on a transient failure, dead-letter what can never be processed.
//! Task deliveries that arrive together are processed together: their built-in tasks
//! as one batch (see `batch.rs`), the others each on its own.

use std::time::{Duration, Instant};

use futures::future::join_all;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing::field::Empty;

use super::messages::parse_task;
use super::task::{count_task, is_builtin};
use super::{Engine, EngineError, Handled, TaskMessage};
use crate::broker::DeadLetter;
use crate::telemetry;

/// Where a delivery came from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    Triggers,
    Tasks(String),
    DeadLetters,
}

impl Source {
    /// The `queue` field of a delivery's span.
    pub(super) fn label(&self) -> &str {
        match self {
            Source::Triggers => "triggers",
            Source::Tasks(queue) => queue,
            Source::DeadLetters => "dead",
        }
    }

    /// The broker queue's full name.
    fn queue(&self, engine: &Engine) -> String {
        let topology = engine.publisher.topology();
        match self {
            Source::Triggers => topology.triggers_queue(),
            Source::Tasks(queue) => topology.task_queue(queue),
            Source::DeadLetters => topology.dead_queue(),
        }
    }
}

/// A delivery with the concurrency slot it holds until it is settled.
pub(super) type Held = (Delivery, OwnedSemaphorePermit);

/// The span of one delivery; task handling records run, node and attempt in it once
/// the message is parsed.
pub(super) fn delivery_span(source: &Source) -> tracing::Span {
    tracing::info_span!(
        "delivery",
        queue = source.label(),
        run = Empty,
        node = Empty,
        attempt = Empty
    )
}

/// Processes task deliveries that arrived together: the built-in ones as one batch; the
/// others are claimed together, then each calls out in a task of its own. `slot` (a
/// batch slot) is held until the database work is done: while every slot is busy,
/// deliveries gather into larger batches.
pub(super) async fn process_tasks(
    engine: Engine,
    source: Source,
    deliveries: Vec<Held>,
    slot: OwnedSemaphorePermit,
    tracker: TaskTracker,
) {
    let mut builtins = Vec::new();
    let mut calls = Vec::new();
    for (delivery, permit) in deliveries {
        match parse_task(&delivery.data) {
            Ok(message) if message.kind.as_deref().is_some_and(is_builtin) => {
                builtins.push((delivery, permit, message));
            }
            Ok(message) => calls.push((delivery, permit, message)),
            // A poison message takes the ordinary path, which dead-letters it.
            Err(_) => spawn_alone(&engine, &source, &tracker, (delivery, permit), None),
        }
    }
    if calls.len() == 1 {
        let (delivery, permit, message) = calls.pop().expect("one");
        spawn_alone(
            &engine,
            &source,
            &tracker,
            (delivery, permit),
            Some(message),
        );
    } else if !calls.is_empty() {
        claim_together(&engine, &source, &tracker, calls).await;
    }
    if builtins.len() == 1 {
        let (delivery, _permit, message) = builtins.pop().expect("one");
        process_task(&engine, &source, delivery, message)
            .instrument(delivery_span(&source))
            .await;
    } else if !builtins.is_empty() {
        process_batch(&engine, &source, builtins)
            .instrument(tracing::info_span!("batch", queue = source.label()))
            .await;
    }
    drop(slot);
}

/// Processes one delivery in a task of its own; `message` when it is parsed already.
fn spawn_alone(
    engine: &Engine,
    source: &Source,
    tracker: &TaskTracker,
    (delivery, permit): Held,
    message: Option<TaskMessage>,
) {
    let (engine, source) = (engine.clone(), source.clone());
    let span = delivery_span(&source);
    tracker.spawn(
        async move {
            let _permit = permit;
            match message {
                Some(message) => process_task(&engine, &source, delivery, message).await,
                None => process(&engine, &source, delivery).await,
            }
        }
        .instrument(span),
    );
}

/// Claims model and HTTP tasks in one transaction, then lets each go on alone. When the
/// claims fail for good, each delivery is processed alone.
async fn claim_together(
    engine: &Engine,
    source: &Source,
    tracker: &TaskTracker,
    calls: Vec<(Delivery, OwnedSemaphorePermit, TaskMessage)>,
) {
    let messages: Vec<_> = calls
        .iter()
        .map(|(delivery, _, message)| (message.clone(), delivery.redelivered))
        .collect();
    let started = Instant::now();
    let claims = match engine.claim_batch(&messages).await {
        Ok(claims) => claims,
        Err(e) => {
            tracing::warn!(error = %e, size = calls.len(), "claiming a batch failed; processing its tasks one by one");
            for (delivery, permit, message) in calls {
                spawn_alone(engine, source, tracker, (delivery, permit), Some(message));
            }
            return;
        }
    };
    for ((delivery, permit, message), claim) in calls.into_iter().zip(claims) {
        let (engine, source) = (engine.clone(), source.clone());
        let span = delivery_span(&source);
        span.record("run", tracing::field::display(message.run_id));
        span.record("node", message.node_id.as_str());
        span.record("attempt", message.attempt);
        tracker.spawn(
            async move {
                let inflight = metrics::gauge!(telemetry::WORKER_INFLIGHT);
                inflight.increment(1.0);
                let outcome = engine
                    .after_claim(&message, delivery.redelivered, claim, started)
                    .await;
                if let Ok(handled) = &outcome {
                    count_task(&message, source.label(), handled);
                }
                settle(&engine, &source.queue(&engine), &delivery, outcome).await;
                drop(permit);
                inflight.decrement(1.0);
            }
            .instrument(span),
        );
    }
}

/// Processes trigger deliveries that arrived together: their runs are created in one
/// transaction. When it fails for good, each delivery is processed alone.
pub(super) async fn process_triggers(
    engine: Engine,
    deliveries: Vec<Held>,
    slot: OwnedSemaphorePermit,
) {
    let source = Source::Triggers;
    if deliveries.len() == 1 {
        let (delivery, _permit) = deliveries.into_iter().next().expect("one");
        process(&engine, &source, delivery)
            .instrument(delivery_span(&source))
            .await;
        return;
    }
    let inflight = metrics::gauge!(telemetry::WORKER_INFLIGHT);
    let size = deliveries.len() as f64;
    inflight.increment(size);
    let events: Vec<(&[u8], bool)> = deliveries
        .iter()
        .map(|(delivery, _)| (delivery.data.as_slice(), delivery.redelivered))
        .collect();
    let span = tracing::info_span!("batch", queue = source.label());
    match engine.handle_triggers(&events).instrument(span).await {
        Ok(outcomes) => {
            let queue = source.queue(&engine);
            let settles = deliveries
                .iter()
                .zip(outcomes)
                .map(|((delivery, _), outcome)| {
                    count_event(&outcome);
                    settle(&engine, &queue, delivery, outcome)
                });
            join_all(settles).await;
            inflight.decrement(size);
        }
        Err(e) => {
            tracing::warn!(error = %e, size = deliveries.len(), "a batch of events failed; processing them one by one");
            // Each counts itself in flight from here.
            inflight.decrement(size);
            for (delivery, _permit) in deliveries {
                process(&engine, &source, delivery)
                    .instrument(delivery_span(&source))
                    .await;
            }
        }
    }
    drop(slot);
}

/// Counts a processed event in `dagq_events_total`.
fn count_event(result: &Result<Handled, EngineError>) {
    if let Ok(Handled::Done(outcome)) = result {
        metrics::counter!(telemetry::EVENTS_TOTAL, "outcome" => *outcome).increment(1);
    }
}

/// Processes built-in task deliveries as one batch. When the batch's transaction
/// fails for good, each delivery is processed alone, so that one bad task cannot hold
/// up the others.
async fn process_batch(
    engine: &Engine,
    source: &Source,
    batch: Vec<(Delivery, OwnedSemaphorePermit, TaskMessage)>,
) {
    let inflight = metrics::gauge!(telemetry::WORKER_INFLIGHT);
    let size = batch.len() as f64;
    inflight.increment(size);
    let messages: Vec<_> = batch
        .iter()
        .map(|(delivery, _, message)| (message.clone(), delivery.redelivered))
        .collect();
    match engine.handle_builtin_batch(&messages).await {
        Ok(outcomes) => {
            let queue = source.queue(engine);
            let settles =
                batch
                    .into_iter()
                    .zip(outcomes)
                    .map(|((delivery, permit, message), outcome)| {
                        if let Ok(handled) = &outcome {
                            count_task(&message, source.label(), handled);
                        }
                        let queue = &queue;
                        async move {
                            settle(engine, queue, &delivery, outcome).await;
                            drop(permit);
                        }
                    });
            join_all(settles).await;
            inflight.decrement(size);
        }
        Err(e) => {
            tracing::warn!(error = %e, size = batch.len(), "a batch failed; processing its tasks one by one");
            // Each counts itself in flight from here.
            inflight.decrement(size);
            for (delivery, _permit, message) in batch {
                process_task(engine, source, delivery, message)
                    .instrument(delivery_span(source))
                    .await;
            }
        }
    }
}

/// Processes one task delivery whose message is parsed already, and settles it.
async fn process_task(engine: &Engine, source: &Source, delivery: Delivery, message: TaskMessage) {
    let inflight = metrics::gauge!(telemetry::WORKER_INFLIGHT);
    inflight.increment(1.0);
    let result = engine
        .handle_task_message(&message, delivery.redelivered, source.label())
        .await;
    settle(engine, &source.queue(engine), &delivery, result).await;
    inflight.decrement(1.0);
}

/// Processes one delivery and settles it.
pub(super) async fn process(engine: &Engine, source: &Source, delivery: Delivery) {
    let inflight = metrics::gauge!(telemetry::WORKER_INFLIGHT);
    inflight.increment(1.0);
    let queue = source.queue(engine);
    let result = match source {
        Source::Triggers => {
            let result = engine
                .handle_trigger(&delivery.data, delivery.redelivered)
                .await;
            count_event(&result);
            result
        }
        Source::Tasks(queue) => {
            engine
                .handle_task(&delivery.data, delivery.redelivered, queue)
                .await
        }
        Source::DeadLetters => {
            engine
                .handle_dead(&delivery.data, &delivery.properties)
                .await
        }
    };
    settle(engine, &queue, &delivery, result).await;
    inflight.decrement(1.0);
}

/// Acks, requeues or dead-letters a delivery by how its processing ended.
async fn settle(
    engine: &Engine,
    queue: &str,
    delivery: &Delivery,
    result: Result<Handled, EngineError>,
) {
    let settle = match result {
        Ok(Handled::Done(outcome)) => {
            tracing::debug!(outcome, "delivery processed");
            Settle::Ack
        }
        Ok(Handled::Poison(poison)) => {
            tracing::warn!(%queue, reason = poison.reason, detail = %poison.detail, "dead-lettering a message that cannot be processed");
            dead_letter(engine, delivery, queue, poison.reason, &poison.detail).await
        }
        Err(e) if e.is_retryable() => {
            tracing::warn!(%queue, error = %e, "cannot process now; requeueing");
            // Back off so that a database outage does not spin the message in a hot loop.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Settle::Requeue
        }
        Err(e) => {
            tracing::error!(%queue, error = %e, "cannot process; dead-lettering");
            dead_letter(engine, delivery, queue, "internal", &e.to_string()).await
        }
    };
    let settled = match settle {
        Settle::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
        }
    };
    if let Err(e) = settled {
        // The channel is gone; the broker requeues the delivery by itself.
        tracing::debug!(error = %e, "could not settle a delivery");
    }
}

enum Settle {
    Ack,
    Requeue,
}

async fn dead_letter(
    engine: &Engine,
    delivery: &Delivery,
    queue: &str,
    reason: &'static str,
    detail: &str,
) -> Settle {
    let letter = DeadLetter {
        reason: reason.into(),
        detail: detail.into(),
        source_queue: queue.into(),
        body: delivery.data.clone(),
    };
    match engine.publish_dead(&letter).await {
        Ok(()) => Settle::Ack,
        Err(e) => {
            tracing::warn!(error = %e, "cannot dead-letter now; requeueing");
            Settle::Requeue
        }
    }
}
