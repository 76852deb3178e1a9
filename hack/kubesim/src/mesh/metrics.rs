//! Istio's standard request metrics (`istio_requests_total`, `istio_request_duration_milliseconds`) in the
//! Prometheus text format. Label values come from cluster objects and response codes only, so series are
//! bounded by what the cluster holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Istio's default buckets for `istio_request_duration_milliseconds`.
pub const BUCKETS_MS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];

/// The proxy that reports a request: the client side (`source`) or the pod's side (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// The labels of one series (Istio's standard labels that make sense in kubesim).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels {
    pub reporter: Reporter,
    /// e.g. `podinfo.test.svc.cluster.local`, or "unknown".
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_app: String,
    pub destination_version: String,
    pub response_code: u16,
    /// Envoy's response flags: `-`, `UH`, `NR`, `NC`, `UF`, `UC`, `UT`.
    pub response_flags: &'static str,
}

/// The simulated clients, as Istio labels the source of traffic entering from outside the mesh.
pub const SOURCE_WORKLOAD: &str = "kubesim-proxy";

impl Labels {
    fn render(&self, out: &mut String) {
        let pairs: [(&str, &str); 16] = [
            ("reporter", self.reporter.as_str()),
            ("source_workload", SOURCE_WORKLOAD),
            ("source_workload_namespace", "unknown"),
            ("source_app", "unknown"),
            ("source_version", "unknown"),
            ("destination_service", &self.destination_service),
            ("destination_service_name", &self.destination_service_name),
            ("destination_service_namespace", &self.destination_service_namespace),
            ("destination_workload", &self.destination_workload),
            ("destination_workload_namespace", &self.destination_workload_namespace),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_version),
            ("destination_canonical_service", &self.destination_app),
            ("request_protocol", "http"),
            ("response_flags", self.response_flags),
            ("connection_security_policy", "unknown"),
        ];
        for (name, value) in pairs {
            let _ = write!(out, "{name}=\"{}\",", escape(value));
        }
        let _ = write!(out, "response_code=\"{}\"", self.response_code);
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

#[derive(Clone, Debug, Default)]
struct Series {
    count: u64,
    sum_ms: f64,
    /// Non-cumulative counts per bucket (the last one is +Inf).
    buckets: [u64; BUCKETS_MS.len() + 1],
}

/// The collected series; shared by the proxies and the pods.
#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<Labels, Series>>,
}

impl Metrics {
    /// Counts one request that took `duration`.
    pub fn record(&self, labels: Labels, duration: Duration) {
        let ms = duration.as_secs_f64() * 1000.0;
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let s = series.entry(labels).or_default();
        s.count += 1;
        s.sum_ms += ms;
        let bucket = BUCKETS_MS.iter().position(|&le| ms <= le).unwrap_or(BUCKETS_MS.len());
        s.buckets[bucket] += 1;
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut out = String::new();
        out.push_str("# HELP istio_requests_total Total number of requests (kubesim mesh).\n");
        out.push_str("# TYPE istio_requests_total counter\n");
        for (labels, s) in &series {
            out.push_str("istio_requests_total{");
            labels.render(&mut out);
            let _ = writeln!(out, "}} {}", s.count);
        }
        out.push_str("# HELP istio_request_duration_milliseconds Request duration in milliseconds (kubesim mesh).\n");
        out.push_str("# TYPE istio_request_duration_milliseconds histogram\n");
        for (labels, s) in &series {
            let mut cumulative = 0;
            let les = BUCKETS_MS.iter().map(|le| le.to_string()).chain(["+Inf".to_owned()]);
            for (le, n) in les.zip(s.buckets) {
                cumulative += n;
                out.push_str("istio_request_duration_milliseconds_bucket{");
                labels.render(&mut out);
                let _ = writeln!(out, ",le=\"{le}\"}} {cumulative}");
            }
            out.push_str("istio_request_duration_milliseconds_sum{");
            labels.render(&mut out);
            let _ = writeln!(out, "}} {}", s.sum_ms);
            out.push_str("istio_request_duration_milliseconds_count{");
            labels.render(&mut out);
            let _ = writeln!(out, "}} {}", s.count);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(code: u16) -> Labels {
        Labels {
            reporter: Reporter::Source,
            destination_service: "podinfo.test.svc.cluster.local".into(),
            destination_service_name: "podinfo".into(),
            destination_service_namespace: "test".into(),
            destination_workload: "podinfo-v2".into(),
            destination_workload_namespace: "test".into(),
            destination_app: "podinfo".into(),
            destination_version: "v2".into(),
            response_code: code,
            response_flags: "-",
        }
    }

    #[test]
    fn requests_are_counted_and_bucketed_cumulatively() {
        let m = Metrics::default();
        m.record(labels(200), Duration::from_millis(3));
        m.record(labels(200), Duration::from_millis(70));
        m.record(labels(500), Duration::from_millis(1));
        let text = m.render();
        assert!(text.contains(r#"destination_workload="podinfo-v2""#), "{text}");
        let line = |prefix: &str, le: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix) && l.contains(r#"response_code="200""#) && l.contains(le))
                .unwrap_or_default()
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(line("istio_requests_total{", ""), "2");
        assert_eq!(line("istio_request_duration_milliseconds_bucket{", r#"le="1""#), "0");
        assert_eq!(line("istio_request_duration_milliseconds_bucket{", r#"le="5""#), "1");
        assert_eq!(line("istio_request_duration_milliseconds_bucket{", r#"le="100""#), "2");
        assert_eq!(line("istio_request_duration_milliseconds_bucket{", r#"le="+Inf""#), "2");
        assert_eq!(line("istio_request_duration_milliseconds_count{", ""), "2");
        assert!(text.contains(r#"response_code="500""#));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
    }
}
