//! Circuit breakers per model profile, shared by every worker through Postgres. After
//! `threshold` consecutive retryable failures a breaker opens: calls skip the profile
//! (to its fallback, or the task waits). After `cooldown` one caller wins a trial call
//! (`half_open`); its success closes the breaker, its failure opens it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::BreakerConfig;
use crate::store::{Store, StoreError};

/// Whether a call may go to a profile now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: call.
    Closed,
    /// This caller won the trial call after the cool-down.
    Trial,
    /// Open (or another caller holds the trial): do not call; retry after this long.
    Open(Duration),
}

/// A change of a breaker's state that operators must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerEvent {
    /// The breaker opened (or re-opened after a failed trial).
    Opened {
        /// Profile.
        profile: String,
        /// The failure that opened it.
        error: String,
        /// Consecutive failures counted.
        failures: i32,
    },
    /// A trial call succeeded: the breaker closed.
    Closed {
        /// Profile.
        profile: String,
    },
}

/// One breaker's row, for `dagq breaker list`.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerState {
    /// Profile.
    pub profile: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Consecutive failures.
    pub consecutive_failures: i32,
    /// When it last opened.
    pub opened_at: Option<DateTime<Utc>>,
    /// The last failure.
    pub last_error: Option<String>,
}

/// How long a locally cached "closed" verdict is trusted before asking Postgres again:
/// bounds how long a worker keeps calling a profile another worker's failures opened.
const CLOSED_CACHE: Duration = Duration::from_millis(500);

/// The breakers, with a small cache so that healthy profiles cost no query per call.
#[derive(Debug, Clone)]
pub struct Breakers {
    store: Store,
    config: BreakerConfig,
    closed_seen: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Breakers {
    /// Breakers stored in `store`, with these thresholds.
    pub fn new(store: Store, config: BreakerConfig) -> Self {
        Breakers {
            store,
            config,
            closed_seen: Arc::default(),
        }
    }

    fn recently_closed(&self, profile: &str) -> bool {
        let seen = self
            .closed_seen
            .lock()
            .expect("breaker cache lock is never held across a panic");
        seen.get(profile)
            .is_some_and(|at| at.elapsed() < CLOSED_CACHE)
    }

    fn remember(&self, profile: &str, closed: bool) {
        let mut seen = self
            .closed_seen
            .lock()
            .expect("breaker cache lock is never held across a panic");
        if closed {
            seen.insert(profile.to_owned(), Instant::now());
        } else {
            seen.remove(profile);
        }
    }

    /// Decides whether a call to `profile` may go ahead.
    pub async fn admit(&self, profile: &str) -> Result<Admission, StoreError> {
        if self.recently_closed(profile) {
            return Ok(Admission::Closed);
        }
        let client = self.store.client().await?;
        let cooldown = self.config.cooldown.as_secs_f64();
        // One statement: the caller that flips open → half_open after the cool-down (or
        // takes over a trial abandoned for as long) owns the trial.
        let row = client
            .query_opt(
                "WITH trial AS (
                     UPDATE breakers SET state = 'half_open', updated_at = now()
                     WHERE profile = $1
                       AND ((state = 'open' AND opened_at <= now() - make_interval(secs => $2))
                         OR (state = 'half_open' AND updated_at <= now() - make_interval(secs => $2)))
                     RETURNING profile
                 )
                 SELECT b.state, EXISTS (SELECT 1 FROM trial),
                        coalesce(greatest(0, extract(epoch FROM
                            b.opened_at + make_interval(secs => $2) - now())), 0)::float8,
                        b.consecutive_failures
                 FROM breakers b WHERE b.profile = $1",
                &[&profile, &cooldown],
            )
            .await?;
        let Some(row) = row else {
            self.remember(profile, true);
            return Ok(Admission::Closed);
        };
        let state: String = row.get(0);
        let won_trial: bool = row.get(1);
        let wait = Duration::from_secs_f64(row.get::<_, f64>(2)).max(Duration::from_secs(1));
        let failures: i32 = row.get(3);
        Ok(match (state.as_str(), won_trial) {
            (_, true) => Admission::Trial,
            ("closed", false) => {
                // Only a clean record may skip the write that resets the count on success.
                self.remember(profile, failures == 0);
                Admission::Closed
            }
            _ => {
                self.remember(profile, false);
                Admission::Open(wait)
            }
        })
    }

    /// Records a call's outcome; returns the state change it caused, if any. Only
    /// retryable failures count: a bad request says nothing about the provider.
    pub async fn record(
        &self,
        profile: &str,
        failure: Option<&str>,
    ) -> Result<Option<BreakerEvent>, StoreError> {
        match failure {
            None if self.recently_closed(profile) => Ok(None),
            None => self.record_success(profile).await,
            Some(error) => self.record_failure(profile, error).await,
        }
    }

    async fn record_success(&self, profile: &str) -> Result<Option<BreakerEvent>, StoreError> {
        let client = self.store.client().await?;
        let row = client
            .query_opt(
                "WITH old AS (SELECT state FROM breakers WHERE profile = $1 FOR UPDATE)
                 UPDATE breakers b SET state = 'closed', consecutive_failures = 0, updated_at = now()
                 FROM old WHERE b.profile = $1 AND (old.state <> 'closed' OR b.consecutive_failures > 0)
                 RETURNING old.state",
                &[&profile],
            )
            .await?;
        self.remember(profile, true);
        Ok(match row.map(|r| r.get::<_, String>(0)) {
            Some(old) if old != "closed" => Some(BreakerEvent::Closed {
                profile: profile.to_owned(),
            }),
            _ => None,
        })
    }

    async fn record_failure(
        &self,
        profile: &str,
        error: &str,
    ) -> Result<Option<BreakerEvent>, StoreError> {
        self.remember(profile, false);
        let client = self.store.client().await?;
        let threshold = self.config.threshold as i32;
        let row = client
            .query_one(
                "WITH old AS (SELECT state FROM breakers WHERE profile = $1 FOR UPDATE)
                 INSERT INTO breakers AS b (profile, state, consecutive_failures, opened_at, last_error, updated_at)
                 VALUES ($1, CASE WHEN 1 >= $3 THEN 'open' ELSE 'closed' END, 1,
                         CASE WHEN 1 >= $3 THEN now() END, $2, now())
                 ON CONFLICT (profile) DO UPDATE SET
                     consecutive_failures = b.consecutive_failures + 1,
                     last_error = $2,
                     updated_at = now(),
                     state = CASE WHEN b.state = 'half_open' OR b.consecutive_failures + 1 >= $3
                                  THEN 'open' ELSE b.state END,
                     opened_at = CASE WHEN b.state = 'half_open'
                                        OR (b.state = 'closed' AND b.consecutive_failures + 1 >= $3)
                                      THEN now() ELSE b.opened_at END
                 RETURNING b.state, b.consecutive_failures, (SELECT state FROM old)",
                &[&profile, &error, &threshold],
            )
            .await?;
        let (state, failures, old): (String, i32, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        let was_open = old.as_deref() == Some("open");
        Ok(
            (state == "open" && !was_open).then(|| BreakerEvent::Opened {
                profile: profile.to_owned(),
                error: error.to_owned(),
                failures,
            }),
        )
    }

    /// Every breaker's state.
    pub async fn list(&self) -> Result<Vec<BreakerState>, StoreError> {
        list(&self.store).await
    }

    /// Profiles whose breaker is open and still cooling down.
    pub async fn cooling_down(&self) -> Result<Vec<String>, StoreError> {
        let client = self.store.client().await?;
        let rows = client
            .query(
                "SELECT profile FROM breakers
                 WHERE state <> 'closed' AND opened_at > now() - make_interval(secs => $1)",
                &[&self.config.cooldown.as_secs_f64()],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// Every breaker's state, for `dagq breaker list`.
pub async fn list(store: &Store) -> Result<Vec<BreakerState>, StoreError> {
    let client = store.client().await?;
    let rows = client
        .query(
            "SELECT profile, state, consecutive_failures, opened_at, last_error FROM breakers ORDER BY profile",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| BreakerState {
            profile: r.get(0),
            state: r.get(1),
            consecutive_failures: r.get(2),
            opened_at: r.get(3),
            last_error: r.get(4),
        })
        .collect())
}

/// Closes a breaker by hand (`dagq breaker reset`); false when it was not known.
pub async fn reset(store: &Store, profile: &str) -> Result<bool, StoreError> {
    let client = store.client().await?;
    let changed = client
        .execute(
            "UPDATE breakers SET state = 'closed', consecutive_failures = 0, updated_at = now() WHERE profile = $1",
            &[&profile],
        )
        .await?;
    Ok(changed == 1)
}
