//! Per-client limits: manifest pulls per minute and new builds per hour, each a
//! GCRA allowance (a burst of the whole allowance, then one more every
//! window/limit), keyed by user name or, for anonymous callers, address.
//!
//! Each replica counts on its own: behind a load balancer without sticky sessions
//! a client gets up to N times the allowance.

use crate::metrics::Metrics;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

type Keyed =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// Which allowance a request draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pulls,
    Builds,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Pulls => "pulls",
            Kind::Builds => "builds",
        }
    }
}

/// A client's standing after a request was admitted, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub limit: u32,
    pub window_secs: u64,
    pub remaining: u32,
}

impl Allowance {
    pub fn headers(&self) -> [(&'static str, String); 2] {
        [
            (
                "RateLimit-Limit",
                format!("{};w={}", self.limit, self.window_secs),
            ),
            ("RateLimit-Remaining", self.remaining.to_string()),
        ]
    }
}

/// A request over the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// The client whose allowance is spent.
    pub client: String,
    pub kind: Kind,
    pub limit: u32,
    pub window_secs: u64,
    pub retry_after_secs: u64,
}

impl Exceeded {
    pub fn headers(&self) -> [(&'static str, String); 2] {
        Allowance {
            limit: self.limit,
            window_secs: self.window_secs,
            remaining: 0,
        }
        .headers()
    }

    pub fn message(&self) -> String {
        let what = match self.kind {
            Kind::Pulls => "manifest pulls per minute",
            Kind::Builds => "new image builds per hour",
        };
        format!(
            "over the limit of {} {what} for this client; try again in {} s",
            self.limit, self.retry_after_secs
        )
    }
}

struct Limit {
    limiter: Keyed,
    limit: u32,
    window_secs: u64,
}

pub struct Limits {
    pulls: Option<Limit>,
    builds: Option<Limit>,
    clock: DefaultClock,
}

impl Limits {
    /// 0 means no limit.
    pub fn new(pulls_per_minute: u32, builds_per_hour: u32) -> Limits {
        let limit = |n: u32, window_secs: u64| {
            let n = NonZeroU32::new(n)?;
            let period = Duration::from_secs(window_secs) / n.get();
            let quota = Quota::with_period(period)?.allow_burst(n);
            Some(Limit {
                limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
                limit: n.get(),
                window_secs,
            })
        };
        Limits {
            pulls: limit(pulls_per_minute, 60),
            builds: limit(builds_per_hour, 3600),
            clock: DefaultClock::default(),
        }
    }

    /// Whether new builds are limited at all.
    pub fn limits_builds(&self) -> bool {
        self.builds.is_some()
    }

    /// Draws one request of `kind` from the allowance of the client `client`
    /// names, which is asked only when there is such a limit; Ok(None) when
    /// there is none.
    pub fn check(
        &self,
        kind: Kind,
        client: impl FnOnce() -> String,
        metrics: &Metrics,
    ) -> Result<Option<Allowance>, Exceeded> {
        let limit = match kind {
            Kind::Pulls => &self.pulls,
            Kind::Builds => &self.builds,
        };
        let Some(l) = limit else {
            return Ok(None);
        };
        let client = client();
        let outcome = l.limiter.check_key(&client);
        let counter = |o: &str| {
            metrics
                .rate_limited
                .with_label_values(&[kind.label(), o])
                .inc()
        };
        match outcome {
            Ok(state) => {
                counter("allowed");
                Ok(Some(Allowance {
                    limit: l.limit,
                    window_secs: l.window_secs,
                    remaining: state.remaining_burst_capacity(),
                }))
            }
            Err(not_until) => {
                counter("refused");
                let wait = not_until.wait_time_from(self.clock.now());
                Err(Exceeded {
                    client,
                    kind,
                    limit: l.limit,
                    window_secs: l.window_secs,
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                })
            }
        }
    }

    /// Forgets clients whose allowance is whole again, so the table does not grow
    /// with every address ever seen.
    pub fn forget_idle(&self) {
        for l in [&self.pulls, &self.builds].into_iter().flatten() {
            l.limiter.retain_recent();
            l.limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_over_the_allowance_is_refused_per_client() {
        let metrics = Metrics::new();
        let limits = Limits::new(3, 0);
        for remaining in [2, 1, 0] {
            let a = limits
                .check(Kind::Pulls, || "alice".into(), &metrics)
                .unwrap()
                .unwrap();
            assert_eq!(a.remaining, remaining);
            assert_eq!(a.headers()[0].1, "3;w=60");
        }
        let e = limits
            .check(Kind::Pulls, || "alice".into(), &metrics)
            .unwrap_err();
        assert_eq!(e.limit, 3);
        assert!((1..=20).contains(&e.retry_after_secs), "{e:?}");
        assert!(e.message().contains("3 manifest pulls per minute"));
        assert!(limits.check(Kind::Pulls, || "bob".into(), &metrics).is_ok());
        assert_eq!(
            limits.check(Kind::Builds, || "alice".into(), &metrics),
            Ok(None)
        );
        let text = metrics.render();
        assert!(
            text.contains(r#"nixery_rate_limited_total{limit="pulls",outcome="refused"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"nixery_rate_limited_total{limit="pulls",outcome="allowed"} 4"#));
    }
}
