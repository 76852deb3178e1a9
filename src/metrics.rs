//! Prometheus metrics of the webhook. Every label value is a `&'static str` from a closed set.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of an admission request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `CREATE`, `UPDATE`, `DELETE`, `CONNECT`, or `unknown` when the body could not be read.
    pub operation: &'static str,
    /// An [`crate::admission::Outcome`] label, or `invalid` / `too_large` for rejected bodies.
    pub outcome: &'static str,
}

/// Labels of a certificate reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `updated` or `failed`.
    pub result: &'static str,
}

/// The webhook's metrics.
#[derive(Debug)]
pub struct WebhookMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histogram,
    pub tls_reloads: Family<ReloadLabels, Counter>,
}

impl WebhookMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            // 100 µs .. ~3.3 s
            duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 16,
            )),
            tls_reloads: Family::default(),
        };
        registry.register(
            "turnout_admission_requests",
            "Admission requests answered, by operation and outcome",
            metrics.requests.clone(),
        );
        registry.register(
            "turnout_admission_duration_seconds",
            "Time to answer an admission request, from the full body to the response",
            metrics.duration.clone(),
        );
        registry.register(
            "turnout_tls_reloads",
            "Changes of the serving certificate files picked up, by result",
            metrics.tls_reloads.clone(),
        );
        metrics
    }
}

/// Renders `registry` in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
