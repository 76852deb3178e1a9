//! Watches: newline-delimited JSON events, replayed from a resourceVersion, filtered by namespace and
//! selectors (an object leaving a selector's view is seen as DELETED, one entering it as ADDED).

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::{Body, key};
use crate::resources::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType, Store, StoreError};

/// A response body fed by a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

struct Filter {
    /// Events carry one-row Tables (`kubectl get -w`) instead of objects.
    table: Option<HashMap<String, String>>,
    resource: Arc<ResourceType>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn sees(&self, o: &Value) -> bool {
        self.labels.matches(&o["metadata"]["labels"]) && self.fields.matches(o)
    }

    /// The event this watch reports for `e`, if any.
    fn translate(&self, e: &Event) -> Option<(&'static str, Value)> {
        if e.resource != key(&self.resource) || self.namespace.as_ref().is_some_and(|ns| *ns != e.namespace) {
            return None;
        }
        let now = self.sees(&e.object);
        let before = e.previous.as_ref().is_some_and(|p| self.sees(p));
        let kind = match (e.kind, before, now) {
            (EventType::Added, _, true) => "ADDED",
            (EventType::Modified, true, true) => "MODIFIED",
            (EventType::Modified, false, true) => "ADDED",
            (EventType::Modified, true, false) => "DELETED",
            (EventType::Deleted, _, true) => "DELETED",
            _ => return None,
        };
        Some((kind, self.served(&e.object)))
    }

    fn served(&self, o: &Value) -> Value {
        let mut o = o.clone();
        o["apiVersion"] = json!(self.resource.api_version());
        o["kind"] = json!(self.resource.kind);
        match &self.table {
            Some(query) => {
                let rv = o["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                super::table::table(&self.resource, std::slice::from_ref(&o), rv, query)
            }
            None => o,
        }
    }
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn expired(message: String) -> Bytes {
    line(
        "ERROR",
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": "Expired", "code": 410}),
    )
}

/// Starts a watch response.
pub fn serve(
    store: Arc<Store>,
    resource: Arc<ResourceType>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    query: &HashMap<String, String>,
    table: bool,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let filter = Filter {
        table: table.then(|| query.clone()),
        resource,
        namespace,
        labels,
        fields,
    };
    let from: Option<u64> = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .filter(|rv| *rv > 0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(30 * 60), Duration::from_secs);
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    tokio::spawn(async move {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut receiver = match from {
            Some(rv) => match store.watch_from(rv) {
                Ok((backlog, receiver)) => {
                    for e in backlog {
                        if let Some((kind, o)) = filter.translate(&e)
                            && tx.send(line(kind, &o)).await.is_err()
                        {
                            return;
                        }
                    }
                    receiver
                }
                Err(e @ StoreError::Gone { .. }) => {
                    let _ = tx.send(expired(e.to_string())).await;
                    return;
                }
                Err(_) => return,
            },
            None => {
                let (items, receiver) = store.watch_now(&key(&filter.resource));
                for o in items {
                    let in_ns = filter
                        .namespace
                        .as_ref()
                        .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns));
                    if in_ns && filter.sees(&o) && tx.send(line("ADDED", &filter.served(&o))).await.is_err() {
                        return;
                    }
                }
                receiver
            }
        };
        let mut bookmark = tokio::time::interval(Duration::from_secs(5));
        bookmark.tick().await;
        let mut last_rv = store.resource_version();
        loop {
            tokio::select! {
                () = &mut deadline => return,
                () = tx.closed() => return,
                _ = bookmark.tick(), if bookmarks => {
                    let object = json!({"kind": filter.resource.kind, "apiVersion": filter.resource.api_version(),
                        "metadata": {"resourceVersion": last_rv.to_string()}});
                    if tx.send(line("BOOKMARK", &object)).await.is_err() {
                        return;
                    }
                }
                received = receiver.recv() => match received {
                    Ok(e) => {
                        last_rv = e.rv;
                        if let Some((kind, o)) = filter.translate(&e)
                            && tx.send(line(kind, &o)).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx.send(expired(format!("the watch fell {n} events behind; relist"))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    let mut r = Response::new(ChannelBody(rx).boxed());
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}
