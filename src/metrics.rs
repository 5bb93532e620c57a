//! Prometheus metrics: requests by route and status with latency histograms, builds
//! started, failed, deduplicated and refused, Nix runs, layers reused against built,
//! bytes uploaded, cache hits by cache, and builds in flight.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub builds_started: IntCounter,
    pub builds_failed: IntCounter,
    pub builds_deduplicated: IntCounter,
    pub builds_rejected: IntCounter,
    pub builds_in_flight: IntGauge,
    pub nix_evaluations: IntCounter,
    pub nix_realisations: IntCounter,
    pub layers_built: IntCounter,
    pub layers_reused: IntCounter,
    pub bytes_uploaded: IntCounter,
    pub cache_hits: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub store_free_bytes: IntGauge,
    pub gc_runs: IntCounter,
    pub gc_freed_bytes: IntCounter,
    pub gc_last_run: IntGauge,
    pub blob_sweeps: IntCounter,
    pub blobs_deleted: IntCounter,
    pub blob_deleted_bytes: IntCounter,
    pub blob_touches: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("nixery".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0,
                ],
            ),
            &["route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_seconds.clone()))
            .expect("unique metric");
        let cache_hits = IntCounterVec::new(
            Opts::new("cache_hits_total", "Cache hits by cache"),
            &["cache"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(cache_hits.clone()))
            .expect("unique metric");
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests checked against a per-client limit, by limit and outcome",
            ),
            &["limit", "outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(rate_limited.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let store_free_bytes = gauge(
            "nix_store_free_bytes",
            "Free bytes on the Nix store's filesystem",
        );
        let gc_last_run = gauge(
            "nix_gc_last_run_timestamp_seconds",
            "When Nix's garbage collector last ran (Unix time)",
        );
        let builds_in_flight =
            IntGauge::new("builds_in_flight", "Builds running or queued").expect("valid metric");
        registry
            .register(Box::new(builds_in_flight.clone()))
            .expect("unique metric");
        Metrics {
            requests,
            request_seconds,
            builds_started: counter("builds_started_total", "Image builds started"),
            builds_failed: counter("builds_failed_total", "Image builds that failed"),
            builds_deduplicated: counter(
                "builds_deduplicated_total",
                "Requests that joined a build already in flight",
            ),
            builds_rejected: counter(
                "builds_rejected_total",
                "Builds refused with 429 because the queue was full",
            ),
            builds_in_flight,
            nix_evaluations: counter("nix_evaluations_total", "nix-instantiate runs"),
            nix_realisations: counter("nix_realisations_total", "nix-store --realise runs"),
            layers_built: counter("layers_built_total", "Layers packed and stored"),
            layers_reused: counter("layers_reused_total", "Layers reused from earlier builds"),
            bytes_uploaded: counter("bytes_uploaded_total", "Blob bytes written to storage"),
            cache_hits,
            rate_limited,
            store_free_bytes,
            gc_runs: counter("nix_gc_runs_total", "Runs of Nix's garbage collector"),
            gc_freed_bytes: counter(
                "nix_gc_freed_bytes_total",
                "Bytes Nix's garbage collector freed",
            ),
            gc_last_run,
            blob_sweeps: counter("blob_sweeps_total", "Sweeps of unused blobs run here"),
            blobs_deleted: counter(
                "blobs_deleted_total",
                "Blobs deleted after going unused for the retention",
            ),
            blob_deleted_bytes: counter(
                "blob_deleted_bytes_total",
                "Bytes of the blobs deleted after going unused",
            ),
            blob_touches: counter(
                "blob_touches_total",
                "Blobs marked as used in storage as a manifest naming them was served",
            ),
            registry,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory");
        String::from_utf8(out).expect("text format is UTF-8")
    }

    pub fn cache_hit(&self, cache: &str) {
        self.cache_hits.with_label_values(&[cache]).inc();
    }
}

/// A low-cardinality label for a request path.
pub fn route_label(path: &str) -> &'static str {
    if path == "/" {
        "index"
    } else if path == "/metrics" {
        "metrics"
    } else if path.starts_with("/builds") {
        "builds"
    } else if path == "/v2" || path == "/v2/" {
        "base"
    } else if path.starts_with("/v2/") {
        if path.contains("/manifests/") {
            "manifest"
        } else if path.contains("/blobs/") {
            "blob"
        } else if path.ends_with("/tags/list") {
            "tags"
        } else if path.contains("/referrers/") {
            "referrers"
        } else {
            "other"
        }
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::new();
        m.builds_started.inc();
        m.cache_hit("tag");
        m.requests
            .with_label_values(&["manifest", "GET", "200"])
            .inc();
        let text = m.render();
        assert!(text.contains("nixery_builds_started_total 1"), "{text}");
        assert!(
            text.contains(r#"nixery_cache_hits_total{cache="tag"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"nixery_http_requests_total{method="GET",route="manifest",status="200"} 1"#
        ));
    }

    #[test]
    fn route_labels() {
        assert_eq!(route_label("/v2/a/b/manifests/latest"), "manifest");
        assert_eq!(route_label("/v2/a/blobs/sha256:x"), "blob");
        assert_eq!(route_label("/v2/"), "base");
        assert_eq!(route_label("/etc/passwd"), "other");
    }
}
