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
use crate::store::{Event, EventType, ResourceKey, Store, StoreError, encode_served};

/// A response body fed by a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

/// At most this many bytes of queued lines are sent as one frame.
const FRAME: usize = 64 * 1024;

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    /// The next line, with every line queued behind it (up to [`FRAME`] bytes): a burst of events goes
    /// out in a few TLS records and writes instead of one per event.
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(first) = std::task::ready!(self.0.poll_recv(cx)) else {
            return Poll::Ready(None);
        };
        if first.len() >= FRAME {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        let mut frame: Option<Vec<u8>> = None;
        while frame.as_ref().map_or(first.len(), Vec::len) < FRAME {
            let Ok(next) = self.0.try_recv() else {
                break;
            };
            frame
                .get_or_insert_with(|| {
                    let mut buf = Vec::with_capacity(FRAME.min(4 * (first.len() + next.len())));
                    buf.extend_from_slice(&first);
                    buf
                })
                .extend_from_slice(&next);
        }
        Poll::Ready(Some(Ok(Frame::data(frame.map_or(first, Bytes::from)))))
    }
}

struct Filter {
    /// Events carry one-row Tables (`kubectl get -w`) instead of objects.
    table: Option<HashMap<String, String>>,
    resource: Arc<ResourceType>,
    /// The store key and apiVersion of `resource`, computed once.
    key: ResourceKey,
    api_version: String,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn sees(&self, o: &Value) -> bool {
        self.labels.matches(&o["metadata"]["labels"]) && self.fields.matches(o)
    }

    /// The line this watch sends for `e`, if any. Objects are encoded once per event and shared by
    /// every watch of the resource at the same version; only Tables are rendered per watch.
    fn translate(&self, e: &Event) -> Option<Bytes> {
        if e.resource != self.key || self.namespace.as_ref().is_some_and(|ns| *ns != e.namespace) {
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
        Some(match &self.table {
            Some(_) => line(kind, &self.served(&e.object)),
            None => line_encoded(kind, &e.encoded(&self.api_version, &self.resource.kind)),
        })
    }

    /// The line of an object that is not an event (the initial state of a watch).
    fn object_line(&self, kind: &str, o: &Value) -> Bytes {
        match &self.table {
            Some(_) => line(kind, &self.served(o)),
            None => line_encoded(kind, &encode_served(o, &self.api_version, &self.resource.kind)),
        }
    }

    fn served(&self, o: &Value) -> Value {
        let mut o = o.clone();
        o["apiVersion"] = json!(self.api_version);
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

/// A watch event line around an object already encoded as JSON.
fn line_encoded(kind: &str, object: &[u8]) -> Bytes {
    const OPEN: &[u8] = b"{\"type\":\"";
    const MIDDLE: &[u8] = b"\",\"object\":";
    let mut bytes = Vec::with_capacity(OPEN.len() + kind.len() + MIDDLE.len() + object.len() + 2);
    bytes.extend_from_slice(OPEN);
    bytes.extend_from_slice(kind.as_bytes());
    bytes.extend_from_slice(MIDDLE);
    bytes.extend_from_slice(object);
    bytes.extend_from_slice(b"}\n");
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
        key: key(&resource),
        api_version: resource.api_version(),
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
                        if let Some(line) = filter.translate(&e)
                            && tx.send(line).await.is_err()
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
                let (items, receiver) = store.watch_now(&filter.key);
                for o in items {
                    let in_ns = filter
                        .namespace
                        .as_ref()
                        .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns));
                    if in_ns && filter.sees(&o) && tx.send(filter.object_line("ADDED", &o)).await.is_err() {
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
                        if let Some(line) = filter.translate(&e)
                            && tx.send(line).await.is_err()
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
