//! The node agent: what kubelets (and the scheduler) would do, as a client of any API server.
//!
//! It registers one Node (`Ready`, large allocatable), binds every unscheduled pod to it, gives each
//! pod an address of a pod network that exists only in the API (`10.244.x.y`; the mesh serves the pod
//! on its loopback twin `127.244.x.y`), writes the status a kubelet writes (`Running`, `Ready` after the
//! readiness delay, container statuses), and finishes graceful deletion: a pod being deleted turns
//! unready, and after its shutdown (`KUBESIM_SHUTDOWN_DELAY_MS`, at most the grace period) is deleted
//! with `gracePeriodSeconds: 0`, as a kubelet does once the containers have exited.
//!
//! Container env changes behaviour: `KUBESIM_READY_DELAY_MS` (overrides the readiness delay),
//! `KUBESIM_NOT_READY=true` (never ready), `KUBESIM_SHUTDOWN_DELAY_MS`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, ResourceExt as _};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Options of the node agent.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The Node's name.
    pub name: String,
    /// How long a pod takes to become Ready (unless its container says otherwise).
    pub pod_ready_delay: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: "kubesim-node".into(),
            pod_ready_delay: Duration::from_millis(500),
        }
    }
}

/// Why the node agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot register Node {name}")]
    Register {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The address the Node reports (and pods' `hostIP`).
pub const NODE_IP: &str = "10.243.0.1";

/// The value of env var `name` in the pod's first container that sets it.
fn env<'a>(pod: &'a Pod, name: &str) -> Option<&'a str> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

fn env_ms(pod: &Pod, name: &str) -> Option<Duration> {
    env(pod, name)?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

fn conditions(ready: bool, at: &str) -> Value {
    let c = |kind: &str, status: bool| json!({"type": kind, "status": if status { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": at});
    json!([
        c("PodReadyToStartContainers", true),
        c("Initialized", true),
        c("Ready", ready),
        c("ContainersReady", ready),
        c("PodScheduled", true)
    ])
}

fn container_statuses(pod: &Pod, ready: bool, started_at: &str) -> Value {
    let containers = pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
    json!(
        containers
            .iter()
            .map(|c| json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "ready": ready, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": started_at}},
                "containerID": format!("kubesim://{}", c.name),
            }))
            .collect::<Vec<_>>()
    )
}

/// What the agent remembers of a pod it runs.
struct Running {
    uid: String,
    /// When it started (readiness counts from here).
    started: Instant,
    /// When its deletion was first seen.
    deleting: Option<Instant>,
}

/// The agent's state.
struct Agent {
    client: Client,
    config: NodeConfig,
    pods: Store<Pod>,
    running: HashMap<ObjectRef<Pod>, Running>,
    next_ip: u32,
    later: mpsc::UnboundedSender<(Duration, ObjectRef<Pod>)>,
}

/// Registers the Node and runs pods until the returned future is dropped.
///
/// # Errors
///
/// The Node cannot be registered.
pub async fn run(client: Client, config: NodeConfig) -> Result<(), NodeError> {
    register(&client, &config.name).await?;
    let pods_api: Api<Pod> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let mut events = watcher(pods_api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .boxed();
    let (later_tx, mut later_rx) = mpsc::unbounded_channel::<(Duration, ObjectRef<Pod>)>();
    let (due_tx, mut due_rx) = mpsc::unbounded_channel::<ObjectRef<Pod>>();
    tokio::spawn(async move {
        while let Some((delay, key)) = later_rx.recv().await {
            let due = due_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = due.send(key);
            });
        }
    });
    let mut agent = Agent {
        client,
        config,
        pods: reader,
        running: HashMap::new(),
        next_ip: 1,
        later: later_tx,
    };
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                    agent.sync(ObjectRef::from_obj(&pod)).await;
                }
                Some(Ok(watcher::Event::Delete(pod))) => {
                    agent.running.remove(&ObjectRef::from_obj(&pod));
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    // Pods deleted while the watch was down are gone from the store.
                    let keys: Vec<ObjectRef<Pod>> = agent.running.keys().cloned().collect();
                    for key in keys {
                        if agent.pods.get(&key).is_none() {
                            agent.running.remove(&key);
                        }
                    }
                }
                Some(Ok(watcher::Event::Init)) => {}
                Some(Err(error)) => {
                    tracing::debug!(error = %crate::report(&error), "node: pod watch failed; retrying");
                }
                None => return Ok(()),
            },
            Some(key) = due_rx.recv() => agent.sync(key).await,
        }
    }
}

/// Creates the Node (or takes the existing one) and marks it Ready.
async fn register(client: &Client, name: &str) -> Result<(), NodeError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let err = |source| NodeError::Register {
        name: name.to_owned(),
        source,
    };
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": "10.244.0.0/16"}
    }))
    .map_err(|e| err(kube::Error::SerdeError(e)))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(err(e)),
    }
    let t = now();
    let status = json!({"status": {
        "capacity": {"cpu": "1000", "memory": "4000Gi", "pods": "10000"},
        "allocatable": {"cpu": "1000", "memory": "4000Gi", "pods": "10000"},
        "addresses": [{"type": "InternalIP", "address": NODE_IP}, {"type": "Hostname", "address": name}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubesim node agent",
            "lastHeartbeatTime": t, "lastTransitionTime": t}],
        "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "kubesim",
            "containerRuntimeVersion": "kubesim://1", "kubeletVersion": "v1.37.2", "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": "amd64"}
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(err)?;
    Ok(())
}

impl Agent {
    /// A pod address no pod has: 10.244.0.1 … 10.244.255.254, skipping .0 and .255 (after a restart
    /// of the agent, the addresses of the pods that kept running are skipped).
    fn ip(&mut self) -> String {
        let taken: std::collections::HashSet<String> = self
            .pods
            .state()
            .iter()
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .collect();
        for _ in 0..0x1_0000 {
            let n = self.next_ip;
            self.next_ip = self.next_ip.wrapping_add(1);
            let (c, d) = ((n >> 8) & 0xff, n & 0xff);
            let ip = Ipv4Addr::new(10, 244, c as u8, d as u8).to_string();
            if d != 0 && d != 255 && !taken.contains(&ip) {
                return ip;
            }
        }
        // Every address is taken: share one (the mesh moves the second listener to a free port).
        Ipv4Addr::new(10, 244, 0, 1).to_string()
    }

    /// Takes one pod one step further.
    async fn sync(&mut self, key: ObjectRef<Pod>) {
        let Some(pod) = self.pods.get(&key) else {
            self.running.remove(&key);
            return;
        };
        if let Err(error) = self.step(&key, &pod).await {
            // Conflicts and races with deletion are normal; try again shortly.
            tracing::debug!(pod = %key, error = %crate::report(&error), "node: pod step failed; retrying");
            let _ = self.later.send((Duration::from_millis(200), key));
        }
    }

    async fn step(&mut self, key: &ObjectRef<Pod>, pod: &Arc<Pod>) -> Result<(), kube::Error> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let spec_node = pod.spec.as_ref().and_then(|s| s.node_name.clone());

        // Schedule: bind to our node.
        let Some(node) = spec_node else {
            if pod.metadata.deletion_timestamp.is_some() {
                return Ok(());
            }
            let binding = json!({"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns, "uid": uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.config.name}});
            return match api
                .create_subresource::<Value, Value>("binding", &name, &PostParams::default(), &binding)
                .await
            {
                Ok(_) => Ok(()),
                // Bound meanwhile (a watch event follows), or gone.
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
                Err(e) => Err(e),
            };
        };
        if node != self.config.name {
            return Ok(());
        }
        let running = self.running.entry(key.clone()).or_insert_with(|| Running {
            uid: uid.clone(),
            started: Instant::now(),
            deleting: None,
        });
        if running.uid != uid {
            *running = Running {
                uid: uid.clone(),
                started: Instant::now(),
                deleting: None,
            };
        }
        let status = pod.status.clone().unwrap_or_default();
        let started_at = serde_json::to_value(&status.start_time)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(now);

        // Graceful deletion: unready at once, deleted when the process has exited.
        if pod.metadata.deletion_timestamp.is_some() {
            let deleting = *running.deleting.get_or_insert_with(Instant::now);
            let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as f64;
            let shutdown = env_ms(pod, "KUBESIM_SHUTDOWN_DELAY_MS").unwrap_or_default();
            let exit_after = shutdown.min(Duration::from_secs_f64(grace));
            let since = deleting.elapsed();
            if since >= exit_after {
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                return match api.delete(&name, &params).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
                    Err(e) => Err(e),
                };
            }
            if is_ready(pod) {
                let t = now();
                let patch = json!({"status": {"conditions": conditions(false, &t),
                    "containerStatuses": container_statuses(pod, false, &started_at)}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            let _ = self
                .later
                .send((exit_after - since + Duration::from_millis(5), key.clone()));
            return Ok(());
        }

        let not_ready = env(pod, "KUBESIM_NOT_READY") == Some("true");
        let delay = env_ms(pod, "KUBESIM_READY_DELAY_MS").unwrap_or(self.config.pod_ready_delay);
        if status.phase.as_deref() != Some("Running") || status.pod_ip.is_none() {
            let started = running.started;
            let ip = self.ip();
            let t = now();
            let patch = json!({"status": {
                "phase": "Running",
                "hostIP": NODE_IP, "hostIPs": [{"ip": NODE_IP}],
                "podIP": ip, "podIPs": [{"ip": ip}],
                "startTime": t,
                "conditions": conditions(false, &t),
                "containerStatuses": container_statuses(pod, false, &t),
            }});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            if !not_ready {
                let wait = delay.saturating_sub(started.elapsed());
                let _ = self.later.send((wait, key.clone()));
            }
            return Ok(());
        }
        if !is_ready(pod) && !not_ready {
            let since = running.started.elapsed();
            if since < delay {
                let _ = self.later.send((delay - since, key.clone()));
                return Ok(());
            }
            let t = now();
            let patch = json!({"status": {"conditions": conditions(true, &t),
                "containerStatuses": container_statuses(pod, true, &started_at)}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Ok(())
    }
}
