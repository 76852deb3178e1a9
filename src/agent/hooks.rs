//! HTTP hooks (DESIGN §6): a POST of a JSON [`Payload`] to a configured URL, with a timeout per
//! attempt and a number of retries. A 2xx answer is a success; anything else, after the last attempt,
//! is a failure with a message that says which hook, where, and what happened.
//!
//! The gates (`pre-rollout`, `rollout`, `confirm-promotion`) run as analysis checks, so a failure
//! counts as a failed check. The notifications (`post-rollout`, `rollback`, `event`) are sent in the
//! background; a failure is logged and counted, and never holds a release.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::{ConfigBuilderExt as _, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::config::{HookKind, ReleaseConfig};
use crate::names::candidate_name;
use crate::release::{DeploymentView, Event, Phase};

/// What a hook is told.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Payload {
    /// The hook's kind (`pre-rollout`, …).
    pub hook: &'static str,
    /// The Deployment.
    pub name: String,
    pub namespace: String,
    /// The release's phase when the hook is called.
    pub phase: String,
    /// The release's revision.
    pub revision: u64,
    /// The candidate's weight in percent.
    pub weight: u8,
    /// The candidate Deployment (`<name>-v<revision>`).
    pub candidate: String,
    /// For the `event` hook: the Event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<EventPayload>,
}

impl Payload {
    /// The payload of a `kind` hook about the release of `view` (and `event`, for the `event` hook).
    pub fn about(kind: HookKind, view: &DeploymentView, event: Option<&Event>) -> Payload {
        let revision = view.status.release.unwrap_or(view.template_revision);
        Payload {
            hook: kind.as_str(),
            name: view.name.clone(),
            namespace: view.namespace.clone(),
            phase: view.status.phase.map_or("-", Phase::as_str).to_owned(),
            revision,
            weight: view.status.weight,
            candidate: candidate_name(&view.name, revision),
            event: event.map(|e| EventPayload {
                type_: if e.warning { "Warning" } else { "Normal" },
                reason: e.reason.to_owned(),
                message: e.message.clone(),
            }),
        }
    }
}

/// An Event, as the `event` hook gets it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventPayload {
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub reason: String,
    pub message: String,
}

/// Calls hooks over HTTP or HTTPS (the system's root certificates).
#[derive(Clone)]
pub struct Caller {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Default for Caller {
    fn default() -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        #[allow(
            clippy::expect_used,
            reason = "ring supports every default protocol version: this cannot fail"
        )]
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        // Without readable system roots, https hooks fail with the TLS error; http ones still work.
        let tls = match builder.clone().with_native_roots() {
            Ok(b) => b.with_no_client_auth(),
            Err(e) => {
                tracing::warn!(error = %e, "no system root certificates: https hooks will fail");
                builder
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            http: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl Caller {
    /// Calls the `kind` hook of `config` with `payload`, if one is configured: `None` when none is,
    /// else what it answered or why it failed.
    pub async fn call(
        &self,
        config: &ReleaseConfig,
        kind: HookKind,
        payload: &Payload,
    ) -> Option<Result<String, String>> {
        let url = config.hooks.get(&kind)?;
        Some(
            self.post(url, payload, config.hook_timeout, config.hook_retries)
                .await
                .map_err(|e| format!("hook {kind} ({url}) {e}")),
        )
    }

    /// POSTs `payload` to `url`, up to `1 + retries` times.
    ///
    /// # Errors
    ///
    /// What the last attempt got: no answer in time, no connection, or a non-2xx status with the
    /// start of its body.
    pub async fn post<P: Serialize>(
        &self,
        url: &str,
        payload: &P,
        timeout: Duration,
        retries: u32,
    ) -> Result<String, String> {
        let body = Bytes::from(serde_json::to_vec(payload).map_err(|e| e.to_string())?);
        let mut last = String::new();
        for attempt in 0..=retries {
            if attempt > 0 {
                // A short, growing pause: a hook that restarts gets a moment.
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            match tokio::time::timeout(timeout, self.attempt(url, body.clone())).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("did not answer within {}", humantime::format_duration(timeout)),
            }
        }
        let attempts = retries + 1;
        Err(if attempts > 1 {
            format!("{last} ({attempts} attempts)")
        } else {
            last
        })
    }

    async fn attempt(&self, url: &str, body: Bytes) -> Result<String, String> {
        let request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, concat!("turnout/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| format!("is not a usable URL: {e}"))?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| format!("unreachable: {}", crate::report::chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("answer cut short: {e}"))?
            .to_bytes();
        let text: String = String::from_utf8_lossy(&body).trim().chars().take(200).collect();
        if status.is_success() {
            Ok(if text.is_empty() {
                format!("answered {status}")
            } else {
                format!("answered {status}: {text}")
            })
        } else if text.is_empty() {
            Err(format!("answered {status}"))
        } else {
            Err(format!("answered {status}: {text}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// A hook server answering each request with the next status of `answers` (the last one repeats),
    /// after `delay`; it hands every body it got to the returned receiver.
    async fn server(answers: Vec<u16>, delay: Duration) -> (String, mpsc::UnboundedReceiver<serde_json::Value>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::unbounded_channel();
        let count = Arc::new(AtomicU32::new(0));
        let answers = Arc::new(answers);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (tx, count, answers) = (tx.clone(), count.clone(), answers.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<Incoming>| {
                        let (tx, count, answers) = (tx.clone(), count.clone(), answers.clone());
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let _ = tx.send(serde_json::from_slice(&body).unwrap());
                            let n = count.fetch_add(1, Ordering::SeqCst) as usize;
                            let status = answers[n.min(answers.len() - 1)];
                            tokio::time::sleep(delay).await;
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(format!("status {status}"))))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (url, rx)
    }

    fn payload() -> Payload {
        Payload {
            hook: "pre-rollout",
            name: "podinfo".into(),
            namespace: "shop".into(),
            phase: "Pending".into(),
            revision: 3,
            weight: 0,
            candidate: "podinfo-v3".into(),
            event: None,
        }
    }

    fn config(url: &str, retries: u32, timeout: Duration) -> ReleaseConfig {
        ReleaseConfig {
            hooks: [(HookKind::PreRollout, url.to_owned())].into(),
            hook_retries: retries,
            hook_timeout: timeout,
            ..ReleaseConfig::default()
        }
    }

    #[tokio::test]
    async fn a_hook_gets_the_release_as_json_and_a_2xx_passes() {
        let (url, mut bodies) = server(vec![200], Duration::ZERO).await;
        let config = config(&url, 0, Duration::from_secs(5));
        let answer = Caller::default().call(&config, HookKind::PreRollout, &payload()).await;
        assert_eq!(answer, Some(Ok("answered 200 OK: status 200".into())));
        assert_eq!(
            bodies.recv().await.unwrap(),
            serde_json::json!({ "hook": "pre-rollout", "name": "podinfo", "namespace": "shop", "phase": "Pending",
                                "revision": 3, "weight": 0, "candidate": "podinfo-v3" })
        );
        assert_eq!(
            Caller::default().call(&config, HookKind::Rollout, &payload()).await,
            None,
            "no rollout hook configured"
        );
    }

    #[tokio::test]
    async fn a_failing_hook_is_retried_and_then_fails_with_what_it_answered() {
        let (url, mut bodies) = server(vec![503, 200], Duration::ZERO).await;
        let caller = Caller::default();
        let answer = caller
            .call(
                &config(&url, 1, Duration::from_secs(5)),
                HookKind::PreRollout,
                &payload(),
            )
            .await;
        assert_eq!(
            answer,
            Some(Ok("answered 200 OK: status 200".into())),
            "the retry passed"
        );
        assert_eq!(
            (bodies.recv().await.is_some(), bodies.recv().await.is_some()),
            (true, true)
        );

        let (url, _bodies) = server(vec![500], Duration::ZERO).await;
        let answer = caller
            .call(
                &config(&url, 2, Duration::from_secs(5)),
                HookKind::PreRollout,
                &payload(),
            )
            .await;
        assert_eq!(
            answer,
            Some(Err(format!(
                "hook pre-rollout ({url}) answered 500 Internal Server Error: status 500 (3 attempts)"
            )))
        );
    }

    #[tokio::test]
    async fn a_slow_or_absent_hook_fails_with_the_reason() {
        let (url, _bodies) = server(vec![200], Duration::from_secs(30)).await;
        let caller = Caller::default();
        let answer = caller
            .call(
                &config(&url, 0, Duration::from_millis(200)),
                HookKind::PreRollout,
                &payload(),
            )
            .await;
        assert_eq!(
            answer,
            Some(Err(format!("hook pre-rollout ({url}) did not answer within 200ms")))
        );
        let closed = "http://127.0.0.1:9/hook";
        let answer = caller
            .call(
                &config(closed, 0, Duration::from_secs(5)),
                HookKind::PreRollout,
                &payload(),
            )
            .await;
        let why = answer.unwrap().unwrap_err();
        assert!(
            why.starts_with("hook pre-rollout (http://127.0.0.1:9/hook) unreachable"),
            "{why}"
        );
    }
}
