//! Retry policy as data, iterated as delays: exponential growth from `initial_delay`,
//! capped at `max_delay`, with jitter, and a provider's `Retry-After` winning when longer.

use std::time::Duration;

use rand::Rng;

use crate::adapter::AdapterError;
use crate::workflow::RetryPolicy;

/// How long to wait before the attempt after `failed_attempt`, or `None` when the error
/// is terminal or the attempts are used up.
pub fn next_delay(
    policy: &RetryPolicy,
    failed_attempt: i32,
    error: &AdapterError,
) -> Option<Duration> {
    if !error.is_retryable() || failed_attempt >= policy.max_attempts as i32 {
        return None;
    }
    let exponent = (failed_attempt - 1).clamp(0, 30);
    let grown = policy.initial_delay.as_secs_f64() * policy.multiplier.powi(exponent);
    let mut delay = Duration::from_secs_f64(grown.min(policy.max_delay.as_secs_f64()));
    if policy.jitter {
        // Between half and the whole delay: spreads a burst of failures over time.
        let factor = rand::rng().random_range(0.5..=1.0);
        delay = delay.mul_f64(factor);
    }
    Some(match error.retry_after() {
        Some(asked) if asked > delay => asked,
        _ => delay,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(3),
            multiplier: 2.0,
            jitter,
        }
    }

    fn status(code: u16, retry_after: Option<u64>) -> AdapterError {
        AdapterError::Status {
            status: code,
            message: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn delays_grow_to_the_cap_and_stop_after_max_attempts() {
        let p = policy(false);
        let delays: Vec<_> = (1..=4)
            .map(|a| next_delay(&p, a, &status(503, None)))
            .collect();
        assert_eq!(
            delays,
            [
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(3)),
                None
            ]
        );
    }

    #[test]
    fn terminal_errors_are_not_retried() {
        assert_eq!(next_delay(&policy(false), 1, &status(400, None)), None);
    }

    #[test]
    fn retry_after_wins_when_longer_and_jitter_stays_in_range() {
        assert_eq!(
            next_delay(&policy(false), 1, &status(429, Some(20))),
            Some(Duration::from_secs(20))
        );
        for _ in 0..100 {
            let d = next_delay(&policy(true), 2, &status(500, None)).unwrap();
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }
}
