//! Built-in adapters that need no provider: nothing goes over the wire.

use serde_json::Value;

use super::{Adapter, AdapterError, Call, Exchange};
use crate::workflow::NodeType;

/// Does nothing; outputs `{}`.
#[derive(Debug, Clone, Copy)]
pub struct Noop;

impl Adapter for Noop {
    async fn call(
        &self,
        _kind: NodeType,
        _call: &Call<'_>,
        _exchange: &mut Exchange,
    ) -> Result<Value, AdapterError> {
        Ok(noop_output())
    }
}

/// What a `noop` node outputs, whatever its run: an empty object. Claims complete noop
/// nodes with it directly (see `store::nodes::ClaimRequest::complete_noop`).
pub fn noop_output() -> Value {
    Value::Object(Default::default())
}

/// Outputs its input with templates rendered: reshapes data between nodes.
#[derive(Debug, Clone, Copy)]
pub struct Transform;

impl Adapter for Transform {
    async fn call(
        &self,
        _kind: NodeType,
        call: &Call<'_>,
        _exchange: &mut Exchange,
    ) -> Result<Value, AdapterError> {
        Ok(call.input.clone())
    }
}
