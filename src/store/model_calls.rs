//! The `model_calls` audit table.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::adapter::ModelCall;

impl Store {
    /// Records the calls made for one attempt of one node, in the order made.
    pub async fn record_model_calls(
        &self,
        run_id: Uuid,
        node_id: &str,
        attempt: i32,
        calls: &[ModelCall],
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        insert_model_calls(&client, run_id, node_id, attempt, calls).await
    }
}

/// Records the calls of one attempt inside the caller's transaction (the one that
/// records the attempt's outcome, so both commit together).
pub(crate) async fn insert_model_calls(
    client: &impl GenericClient,
    run_id: Uuid,
    node_id: &str,
    attempt: i32,
    calls: &[ModelCall],
) -> Result<(), StoreError> {
    if calls.is_empty() {
        return Ok(());
    }
    let seq: Vec<i16> = (0..calls.len() as i16).collect();
    let profile: Vec<&str> = calls.iter().map(|c| c.profile.as_str()).collect();
    let provider: Vec<&str> = calls.iter().map(|c| c.provider).collect();
    let model: Vec<Option<&str>> = calls.iter().map(|c| c.model.as_deref()).collect();
    let status: Vec<&str> = calls.iter().map(|c| c.status.as_str()).collect();
    let http_status: Vec<Option<i32>> =
        calls.iter().map(|c| c.http_status.map(i32::from)).collect();
    let latency: Vec<f64> = calls
        .iter()
        .map(|c| c.latency.as_secs_f64() * 1000.0)
        .collect();
    let prompt: Vec<i32> = calls.iter().map(|c| c.usage.prompt_tokens as i32).collect();
    let completion: Vec<i32> = calls
        .iter()
        .map(|c| c.usage.completion_tokens as i32)
        .collect();
    let cost: Vec<Option<f64>> = calls.iter().map(|c| c.cost).collect();
    let request: Vec<&serde_json::Value> = calls.iter().map(|c| &c.request).collect();
    let response: Vec<Option<&serde_json::Value>> =
        calls.iter().map(|c| c.response.as_ref()).collect();
    let error: Vec<Option<&str>> = calls.iter().map(|c| c.error.as_deref()).collect();
    let stmt = client
            .prepare_cached(
                "INSERT INTO model_calls (run_id, node_id, attempt, seq, profile, provider, model, status,
                     http_status, latency_ms, prompt_tokens, completion_tokens, cost, request, response, error)
                 SELECT $1, $2, $3, u.* FROM unnest($4::smallint[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::int[], $10::float8[], $11::int[], $12::int[], $13::float8[],
                     $14::jsonb[], $15::jsonb[], $16::text[]) AS u",
            )
            .await?;
    client
        .execute(
            &stmt,
            &[
                &run_id,
                &node_id,
                &attempt,
                &seq,
                &profile,
                &provider,
                &model,
                &status,
                &http_status,
                &latency,
                &prompt,
                &completion,
                &cost,
                &request,
                &response,
                &error,
            ],
        )
        .await?;
    Ok(())
}
