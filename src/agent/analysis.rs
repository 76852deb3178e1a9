//! Analysis of a candidate (DESIGN §6): readiness and restarts, then the built-in Istio checks through
//! Prometheus instant queries (request success rate, P99 latency of `destination_workload` = the
//! candidate). A query without data is an explicit outcome ([`NoData`]); an unreachable Prometheus is a
//! failed check with the reason, never a hang.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::hooks::{Caller, Payload};
use crate::config::{HookKind, NoData, ReleaseConfig};
use crate::release::{CandidateView, DeploymentView, Stage, Verdict};

/// Outcome of one check, for the `turnout_analysis_checks_total{check,result}` metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// `readiness`, `success-rate`, `latency-p99`, `custom`, or a hook's kind (`pre-rollout`, …).
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
    /// The value measured, for a metric check that had data.
    pub value: Option<f64>,
    /// What the value had to be, as shown beside it (`>= 99%`, `<= 500ms`), for a metric check.
    pub bound: Option<String>,
}

impl Check {
    /// A check without a measured value (readiness, a hook).
    pub fn plain(name: &'static str, passed: bool, detail: String) -> Self {
        Self {
            name,
            passed,
            detail,
            value: None,
            bound: None,
        }
    }
}

/// Runs the checks against one Prometheus per release configuration.
#[derive(Clone)]
pub struct Analyser {
    http: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    hooks: Caller,
}

impl Default for Analyser {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            http: Client::builder(TokioExecutor::new()).build(connector),
            timeout: Duration::from_secs(5),
            hooks: Caller::default(),
        }
    }
}

impl Analyser {
    /// The hook caller, shared with the notifications.
    pub fn hooks(&self) -> &Caller {
        &self.hooks
    }

    /// The checks of `stage` for `candidate` of the Deployment `d`: the gate hooks due, and at a step
    /// the readiness, metric and custom checks.
    pub async fn analyse_stage(
        &self,
        config: &ReleaseConfig,
        d: &DeploymentView,
        candidate: &CandidateView,
        stage: Stage,
    ) -> Vec<Check> {
        let hooks = match stage {
            Stage::PreRollout => vec![HookKind::PreRollout],
            Stage::Step { confirm } | Stage::Standby { confirm } => {
                let mut hooks = vec![HookKind::Rollout];
                if confirm {
                    hooks.push(HookKind::ConfirmPromotion);
                }
                hooks
            }
        };
        let mut checks = match stage {
            Stage::Step { .. } => self.analyse(config, &d.namespace, &d.name, candidate).await,
            // No live request reaches a standby candidate: its readiness is what there is to check.
            Stage::Standby { .. } => vec![readiness(candidate)],
            Stage::PreRollout => Vec::new(),
        };
        for kind in hooks {
            let payload = Payload::about(kind, d, None);
            if let Some(answer) = self.hooks.call(config, kind, &payload).await {
                let (passed, detail) = match answer {
                    Ok(answer) => (true, format!("hook {kind} {answer}")),
                    Err(why) => (false, why),
                };
                checks.push(Check::plain(kind.as_str(), passed, detail));
            }
        }
        checks
    }

    /// Every check of `candidate` of Deployment `target` in namespace `ns`, hooks aside.
    pub async fn analyse(
        &self,
        config: &ReleaseConfig,
        ns: &str,
        target: &str,
        candidate: &CandidateView,
    ) -> Vec<Check> {
        let mut checks = vec![readiness(candidate)];
        let Some(prometheus) = &config.prometheus else {
            if !config.checks.is_empty() {
                checks.push(Check::plain(
                    "custom",
                    false,
                    "custom checks need a Prometheus (turnout.dev/prometheus or --prometheus)".into(),
                ));
            }
            return checks;
        };
        let window = format!("{}s", config.interval.as_secs().max(5));
        let selector = format!(
            r#"reporter="destination",destination_workload_namespace="{ns}",destination_workload="{}""#,
            candidate.name
        );
        let success = format!(
            r#"100 * sum(rate(istio_requests_total{{{selector},response_code!~"5.."}}[{window}])) / sum(rate(istio_requests_total{{{selector}}}[{window}]))"#
        );
        let p99 = format!(
            r#"histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket{{{selector}}}[{window}])))"#
        );
        let min = config.success_rate_min;
        checks.push(
            self.metric(
                prometheus,
                "success-rate",
                &success,
                config.no_data,
                format!(">= {min}%"),
                |v| {
                    if v >= min {
                        Ok(format!("success rate {v:.1}%"))
                    } else {
                        Err(format!("success rate {v:.1}% < {min}%"))
                    }
                },
            )
            .await,
        );
        let max = config.latency_p99_max.as_secs_f64() * 1000.0;
        checks.push(
            self.metric(
                prometheus,
                "latency-p99",
                &p99,
                config.no_data,
                format!("<= {max:.0}ms"),
                |v| {
                    if v <= max {
                        Ok(format!("P99 latency {v:.0}ms"))
                    } else {
                        Err(format!("P99 latency {v:.0}ms > {max:.0}ms"))
                    }
                },
            )
            .await,
        );
        for custom in &config.checks {
            let query = custom.render(ns, target, &candidate.name, &window);
            let judge = |v| within(&custom.name, v, custom.min, custom.max);
            let bound = range_of(custom.min, custom.max);
            let mut check = self
                .metric(prometheus, "custom", &query, config.no_data, bound, judge)
                .await;
            if !check.detail.starts_with(&custom.name) {
                check.detail = format!("{}: {}", custom.name, check.detail);
            }
            checks.push(check);
        }
        checks
    }

    async fn metric(
        &self,
        prometheus: &str,
        name: &'static str,
        query: &str,
        no_data: NoData,
        bound: String,
        judge: impl Fn(f64) -> Result<String, String>,
    ) -> Check {
        let mut value = None;
        let (passed, detail) = match self.query(prometheus, query).await {
            Ok(Some(v)) => {
                value = Some(v);
                match judge(v) {
                    Ok(d) => (true, d),
                    Err(d) => (false, d),
                }
            }
            Ok(None) => (
                no_data == NoData::Pass,
                format!("{name}: no data from Prometheus (no-data policy: {no_data:?})").to_lowercase(),
            ),
            Err(e) => (false, format!("{name}: {e}")),
        };
        Check {
            name,
            passed,
            detail,
            value,
            bound: Some(bound),
        }
    }

    /// One instant query; `None` when the result is empty or not a number.
    ///
    /// # Errors
    ///
    /// Prometheus unreachable, slow, or answering something other than a vector.
    pub async fn query(&self, prometheus: &str, query: &str) -> Result<Option<f64>, String> {
        let body = self
            .get(prometheus, &format!("/api/v1/query?query={}", encode(query)))
            .await?;
        parse(&body).map_err(|e| format!("Prometheus at {prometheus}: {e}"))
    }

    /// One range query from `start` to `end` (seconds since the epoch) every `step` seconds: one
    /// series per label set.
    ///
    /// # Errors
    ///
    /// As [`Analyser::query`].
    pub async fn range(
        &self,
        prometheus: &str,
        query: &str,
        start: u64,
        end: u64,
        step: u64,
    ) -> Result<Vec<Series>, String> {
        let path = format!(
            "/api/v1/query_range?query={}&start={start}&end={end}&step={}",
            encode(query),
            step.max(1)
        );
        let body = self.get(prometheus, &path).await?;
        parse_matrix(&body).map_err(|e| format!("Prometheus at {prometheus}: {e}"))
    }

    /// GET `path` of `prometheus`: the body of a success, else why not, within the timeout.
    async fn get(&self, prometheus: &str, path: &str) -> Result<Bytes, String> {
        let uri: http::Uri = format!("{prometheus}{path}")
            .parse()
            .map_err(|e| format!("bad Prometheus URL {prometheus}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("Prometheus at {prometheus}: only http:// is supported"));
        }
        let request = async {
            let response = self
                .http
                .get(uri)
                .await
                .map_err(|e| format!("Prometheus at {prometheus} unreachable: {e}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("Prometheus at {prometheus}: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!(
                    "Prometheus at {prometheus} answered {status}: {}",
                    String::from_utf8_lossy(&body).chars().take(200).collect::<String>()
                ));
            }
            Ok(body)
        };
        tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| format!("Prometheus at {prometheus} did not answer within {:?}", self.timeout))?
    }
}

/// One series of a range query: its labels and its points (seconds since the epoch, value).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Series {
    pub labels: std::collections::BTreeMap<String, String>,
    pub points: Vec<(f64, f64)>,
}

/// The series of a range-query answer (`"resultType":"matrix"`); points that are not finite numbers
/// are left out.
fn parse_matrix(body: &[u8]) -> Result<Vec<Series>, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(format!(
            "query failed: {}",
            v["error"].as_str().unwrap_or("unknown error")
        ));
    }
    let data = &v["data"];
    if data["resultType"] != "matrix" {
        return Err(format!("unexpected result type {}", data["resultType"]));
    }
    let series = data["result"].as_array().map(Vec::as_slice).unwrap_or_default();
    Ok(series
        .iter()
        .map(|s| Series {
            labels: s["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect(),
            points: s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let t = p[0].as_f64()?;
                    let v = p[1].as_str()?.parse::<f64>().ok().filter(|v| v.is_finite())?;
                    Some((t, v))
                })
                .collect(),
        })
        .collect())
}

/// Whether `value` of check `name` lies within `[min, max]`, with the detail either way.
fn within(name: &str, value: f64, min: Option<f64>, max: Option<f64>) -> Result<String, String> {
    let range = range_of(min, max);
    if min.is_some_and(|lo| value < lo) || max.is_some_and(|hi| value > hi) {
        Err(format!("{name} {value:.3} not {range}"))
    } else {
        Ok(format!("{name} {value:.3}"))
    }
}

/// `[min, max]`, `>= min`, `<= max` or `any`.
fn range_of(min: Option<f64>, max: Option<f64>) -> String {
    match (min, max) {
        (Some(lo), Some(hi)) => format!("[{lo}, {hi}]"),
        (Some(lo), None) => format!(">= {lo}"),
        (None, Some(hi)) => format!("<= {hi}"),
        (None, None) => "any".to_owned(),
    }
}

fn readiness(c: &CandidateView) -> Check {
    let (passed, detail) = if !c.available {
        (false, format!("candidate {} is not available", c.name))
    } else if c.restarts > 0 {
        (false, format!("candidate {} restarted {} times", c.name, c.restarts))
    } else {
        (true, format!("candidate {} ready", c.name))
    };
    Check::plain("readiness", passed, detail)
}

/// The verdict of a set of checks: passed if all passed; the message lists the failures, or what passed.
pub fn verdict(checks: &[Check]) -> Verdict {
    let failed: Vec<&str> = checks.iter().filter(|c| !c.passed).map(|c| c.detail.as_str()).collect();
    if failed.is_empty() {
        Verdict {
            passed: true,
            message: checks.iter().map(|c| c.detail.as_str()).collect::<Vec<_>>().join(", "),
        }
    } else {
        Verdict {
            passed: false,
            message: failed.join(", "),
        }
    }
}

/// The value of an instant-query answer (`{"status":"success","data":{"resultType":"vector",...}}`).
fn parse(body: &[u8]) -> Result<Option<f64>, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(format!(
            "query failed: {}",
            v["error"].as_str().unwrap_or("unknown error")
        ));
    }
    let data = &v["data"];
    let value = match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .and_then(|r| r.first())
            .map(|s| &s["value"][1]),
        Some("scalar") => Some(&data["result"][1]),
        other => return Err(format!("unexpected result type {other:?}")),
    };
    Ok(value
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| f.is_finite()))
}

/// Percent-encodes a query parameter.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_with_no_data_and_nan_as_none() {
        let vector =
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.0,"99.5"]}]}}"#;
        assert_eq!(parse(vector), Ok(Some(99.5)));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse(empty), Ok(None));
        let nan =
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.0,"NaN"]}]}}"#;
        assert_eq!(parse(nan), Ok(None));
        let error = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        assert_eq!(parse(error), Err("query failed: parse error at char 3".into()));
        assert!(parse(b"<html>").unwrap_err().starts_with("not JSON"));
    }

    #[test]
    fn range_answers_become_series_without_the_points_that_are_not_numbers() {
        let body = br#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"destination_workload":"podinfo"},"values":[[10,"2.5"],[11,"NaN"],[12,"3"]]},
            {"metric":{"destination_workload":"podinfo-v2"},"values":[[12,"0.5"]]}]}}"#;
        let series = parse_matrix(body).unwrap();
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].labels["destination_workload"], "podinfo");
        assert_eq!(series[0].points, vec![(10.0, 2.5), (12.0, 3.0)]);
        assert_eq!(series[1].points, vec![(12.0, 0.5)]);
        assert!(parse_matrix(br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#).is_err());
        assert_eq!(
            parse_matrix(br#"{"status":"error","error":"bad query"}"#),
            Err("query failed: bad query".into())
        );
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(encode(r#"a{b="c"} / 2"#), "a%7Bb%3D%22c%22%7D%20%2F%202");
    }

    fn candidate(available: bool, restarts: u32) -> CandidateView {
        CandidateView {
            name: "podinfo-v2".into(),
            revision: 2,
            hash: Some("abc".into()),
            available,
            pods: 2,
            restarts,
            created_at: 0,
            deleting: false,
            template_hash: None,
            scale: None,
            held: false,
            replicas: 2,
            misplaced: 0,
            ready_at: 0,
        }
    }

    #[test]
    fn readiness_fails_on_unavailable_or_restarting_candidates() {
        assert!(readiness(&candidate(true, 0)).passed);
        assert_eq!(
            readiness(&candidate(false, 0)).detail,
            "candidate podinfo-v2 is not available"
        );
        assert_eq!(
            readiness(&candidate(true, 2)).detail,
            "candidate podinfo-v2 restarted 2 times"
        );
    }

    #[tokio::test]
    async fn an_unreachable_prometheus_is_a_failed_check_with_the_reason() {
        let config = ReleaseConfig {
            prometheus: Some("http://127.0.0.1:9".into()),
            ..ReleaseConfig::default()
        };
        let checks = Analyser::default()
            .analyse(&config, "shop", "podinfo", &candidate(true, 0))
            .await;
        assert_eq!(checks.len(), 3);
        assert!(checks[0].passed);
        for c in &checks[1..] {
            assert!(!c.passed);
            assert!(c.detail.contains("unreachable"), "{}", c.detail);
        }
        let v = verdict(&checks);
        assert!(!v.passed);
        assert!(
            v.message
                .starts_with("success-rate: Prometheus at http://127.0.0.1:9 unreachable"),
            "{}",
            v.message
        );
    }

    #[test]
    fn custom_values_are_judged_against_their_range() {
        assert_eq!(within("errors", 0.5, None, Some(1.0)), Ok("errors 0.500".into()));
        assert_eq!(
            within("errors", 2.0, Some(0.0), Some(1.0)),
            Err("errors 2.000 not [0, 1]".into())
        );
        assert_eq!(within("rps", 0.2, Some(1.0), None), Err("rps 0.200 not >= 1".into()));
    }

    #[tokio::test]
    async fn custom_checks_without_prometheus_fail_saying_so() {
        let config = ReleaseConfig {
            checks: vec![crate::config::parse_check("errors", r#"{"query": "x", "max": 1}"#).unwrap()],
            ..ReleaseConfig::default()
        };
        let checks = Analyser::default()
            .analyse(&config, "shop", "podinfo", &candidate(true, 0))
            .await;
        assert_eq!(checks.len(), 2);
        assert!(!checks[1].passed);
        assert!(checks[1].detail.contains("need a Prometheus"), "{}", checks[1].detail);
    }

    #[test]
    fn a_verdict_passes_only_when_every_check_passes() {
        let ok = Check::plain("readiness", true, "ready".into());
        let bad = Check::plain("success-rate", false, "success rate 50.0% < 99%".into());
        assert_eq!(verdict(std::slice::from_ref(&ok)).message, "ready");
        let v = verdict(&[ok, bad]);
        assert_eq!((v.passed, v.message.as_str()), (false, "success rate 50.0% < 99%"));
    }
}
