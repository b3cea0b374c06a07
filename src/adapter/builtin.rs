//! Built-in adapters that need no provider.

use serde_json::Value;

use super::{Adapter, AdapterError, Call};

/// Does nothing; outputs `{}`.
#[derive(Debug, Clone, Copy)]
pub struct Noop;

impl Adapter for Noop {
    async fn call(&self, _call: &Call<'_>) -> Result<Value, AdapterError> {
        Ok(Value::Object(Default::default()))
    }
}

/// Outputs its input with templates rendered: reshapes data between nodes.
#[derive(Debug, Clone, Copy)]
pub struct Transform;

impl Adapter for Transform {
    async fn call(&self, call: &Call<'_>) -> Result<Value, AdapterError> {
        Ok(call.input.clone())
    }
}
