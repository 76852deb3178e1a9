//! The `/mutate` endpoint: body limit, decode, one span per request, metrics, encode.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use tracing::{Instrument, field::Empty};

use crate::admin::text;
use crate::admission::{self, ReviewError};
use crate::metrics::{RequestLabels, WebhookMetrics};

/// The admission endpoint's state.
#[derive(Debug)]
pub struct Handler {
    pub config: admission::Config,
    pub metrics: Arc<WebhookMetrics>,
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_body_bytes: usize,
}

impl Handler {
    /// Routes one HTTP request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/mutate") => self.mutate(req).await,
            (_, "/mutate") => {
                let mut r = text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "turnout: /mutate takes POST of an AdmissionReview\n",
                );
                r.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "turnout: not found; the admission endpoint is POST /mutate\n",
            ),
        }
    }

    async fn mutate(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let span = tracing::info_span!(
            "admission",
            uid = Empty,
            namespace = Empty,
            name = Empty,
            operation = Empty,
            dry_run = Empty,
            outcome = Empty,
        );
        async {
            let too_large = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .is_some_and(|len| len > self.max_body_bytes);
            let body = if too_large {
                Err(self.rejected_too_large())
            } else {
                match Limited::new(req.into_body(), self.max_body_bytes).collect().await {
                    Ok(collected) => Ok(collected.to_bytes()),
                    Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(self.rejected_too_large()),
                    Err(error) => {
                        tracing::debug!(%error, "could not read the request body");
                        Err(self.rejected(StatusCode::BAD_REQUEST, "invalid", "could not read the request body"))
                    }
                }
            };
            let body = match body {
                Ok(body) => body,
                Err(response) => return response,
            };
            let start = Instant::now();
            let result = admission::review(&body, &self.config);
            match result {
                Ok(reviewed) => {
                    let f = &reviewed.facts;
                    let span = tracing::Span::current();
                    span.record("uid", f.uid.as_str());
                    span.record("namespace", f.namespace.as_str());
                    span.record("name", f.name.as_str());
                    span.record("operation", operation_label(&f.operation));
                    span.record("dry_run", f.dry_run);
                    span.record("outcome", f.outcome.as_str());
                    let encoded = reviewed.to_json(false);
                    self.metrics.duration.observe(start.elapsed().as_secs_f64());
                    self.metrics
                        .requests
                        .get_or_create(&RequestLabels {
                            operation: operation_label(&f.operation),
                            outcome: f.outcome.as_str(),
                        })
                        .inc();
                    tracing::info!(patched = f.patched, "admission reviewed");
                    match encoded {
                        Ok(bytes) => {
                            let mut r = Response::new(Full::new(Bytes::from(bytes)));
                            r.headers_mut().insert(
                                header::CONTENT_TYPE,
                                header::HeaderValue::from_static("application/json"),
                            );
                            r
                        }
                        Err(error) => {
                            tracing::error!(%error, "could not encode the AdmissionReview response");
                            text(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "turnout: could not encode the response\n",
                            )
                        }
                    }
                }
                Err(error) => self.invalid(&error),
            }
        }
        .instrument(span)
        .await
    }

    fn invalid(&self, error: &ReviewError) -> Response<Full<Bytes>> {
        let reason = crate::report::chain(error);
        self.rejected(StatusCode::BAD_REQUEST, "invalid", &reason)
    }

    fn rejected_too_large(&self) -> Response<Full<Bytes>> {
        let reason = format!("request body larger than {} bytes", self.max_body_bytes);
        self.rejected(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &reason)
    }

    fn rejected(&self, status: StatusCode, outcome: &'static str, reason: &str) -> Response<Full<Bytes>> {
        tracing::Span::current().record("outcome", outcome);
        tracing::warn!(%reason, "rejected an admission request");
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                operation: "unknown",
                outcome,
            })
            .inc();
        text(status, &format!("turnout: {reason}\n"))
    }
}

/// Bounded label for an admission operation.
pub fn operation_label(op: &kube::core::admission::Operation) -> &'static str {
    use kube::core::admission::Operation;
    match op {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}
