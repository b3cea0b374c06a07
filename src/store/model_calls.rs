//! The `model_calls` audit table.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::StoreError;
use crate::adapter::ModelCall;

/// The calls one attempt of one node made, in the order made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttemptCalls<'a> {
    /// Run id.
    pub run_id: Uuid,
    /// Node id.
    pub node_id: &'a str,
    /// The attempt.
    pub attempt: i32,
    /// Its calls: the primary profile's, then each fallback's.
    pub calls: &'a [ModelCall],
}

/// Records the calls of many attempts, in one statement, inside the caller's
/// transaction (the one that records the attempts' outcomes, so both commit together).
pub(crate) async fn insert_model_calls(
    client: &impl GenericClient,
    attempts: &[AttemptCalls<'_>],
) -> Result<(), StoreError> {
    let rows: Vec<(&AttemptCalls, i16, &ModelCall)> = attempts
        .iter()
        .flat_map(|a| (0..).zip(a.calls).map(move |(seq, call)| (a, seq, call)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let run_id: Vec<Uuid> = rows.iter().map(|r| r.0.run_id).collect();
    let node_id: Vec<&str> = rows.iter().map(|r| r.0.node_id).collect();
    let attempt: Vec<i32> = rows.iter().map(|r| r.0.attempt).collect();
    let seq: Vec<i16> = rows.iter().map(|r| r.1).collect();
    let calls = || rows.iter().map(|r| r.2);
    let profile: Vec<&str> = calls().map(|c| c.profile.as_str()).collect();
    let provider: Vec<&str> = calls().map(|c| c.provider).collect();
    let model: Vec<Option<&str>> = calls().map(|c| c.model.as_deref()).collect();
    let status: Vec<&str> = calls().map(|c| c.status.as_str()).collect();
    let http_status: Vec<Option<i32>> = calls().map(|c| c.http_status.map(i32::from)).collect();
    let latency: Vec<f64> = calls().map(|c| c.latency.as_secs_f64() * 1000.0).collect();
    let prompt: Vec<i32> = calls().map(|c| c.usage.prompt_tokens as i32).collect();
    let completion: Vec<i32> = calls().map(|c| c.usage.completion_tokens as i32).collect();
    let cost: Vec<Option<f64>> = calls().map(|c| c.cost).collect();
    let request: Vec<&serde_json::Value> = calls().map(|c| &c.request).collect();
    let response: Vec<Option<&serde_json::Value>> = calls().map(|c| c.response.as_ref()).collect();
    let error: Vec<Option<&str>> = calls().map(|c| c.error.as_deref()).collect();
    let stmt = client
        .prepare_cached(
            "INSERT INTO model_calls (run_id, node_id, attempt, seq, profile, provider, model, status,
                 http_status, latency_ms, prompt_tokens, completion_tokens, cost, request, response, error)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::smallint[], $5::text[],
                 $6::text[], $7::text[], $8::text[], $9::int[], $10::float8[], $11::int[],
                 $12::int[], $13::float8[], $14::jsonb[], $15::jsonb[], $16::text[])",
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
