//! Leader election on a `coordination.k8s.io/v1` Lease: among the agent's replicas only the holder
//! runs releases; when it stops renewing, another takes over once the lease has expired.
//!
//! Expiry is judged on this replica's own clock, from when it last saw the record change (as
//! client-go does), so clocks that disagree between nodes do not matter. Every write names the
//! resource version it read: two replicas racing for the lease cannot both win.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Leader election settings.
#[derive(Clone, Debug, clap::Args)]
#[group(id = "leader-election")]
#[command(next_help_heading = "Leader election (one active agent among replicas)")]
pub struct ElectionArgs {
    /// Run releases only while holding the Lease (off: this process always acts).
    #[arg(long, env = "TURNOUT_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the Lease.
    #[arg(long, env = "TURNOUT_LEASE_NAMESPACE", default_value = "turnout-system")]
    pub lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, env = "TURNOUT_LEASE_NAME", default_value = "turnout-agent")]
    pub lease_name: String,
    /// How long a leader that stopped renewing keeps the Lease; a follower takes over after it.
    #[arg(long, env = "TURNOUT_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease (default: the host name, the pod's name in a cluster).
    #[arg(long, env = "TURNOUT_IDENTITY")]
    pub identity: Option<String>,
}

/// One replica's view of the Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The holder and renew time last seen, and when (on this clock) they were first seen.
    seen: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(client: Client, args: &ElectionArgs) -> Self {
        let identity = args.identity.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("turnout-{}", std::process::id()))
        });
        Self {
            api: Api::namespaced(client, &args.lease_namespace),
            name: args.lease_name.clone(),
            identity,
            duration: args.lease_duration.max(Duration::from_secs(1)),
            seen: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&mut self) {
        self.acquire_following(|| {}).await;
    }

    /// As [`Elector::acquire`]; `following` is called each time another replica is found holding it.
    pub async fn acquire_following(&mut self, following: impl Fn()) {
        loop {
            match self.try_hold().await {
                Ok(true) => return,
                Ok(false) => following(),
                Err(e) => tracing::warn!(error = %e, lease = %self.name, "cannot read or write the leader Lease"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the Lease until it is lost (another holder, or no renewal for a whole lease duration).
    pub async fn hold(&mut self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_hold().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "cannot renew the leader Lease");
                    // Stop before a follower may take over: it waits a whole duration.
                    if renewed.elapsed() >= self.duration * 2 / 3 {
                        return;
                    }
                }
            }
        }
    }

    /// Takes or renews the Lease if free, expired or ours. `Ok(false)`: someone else holds it.
    async fn try_hold(&mut self) -> kube::Result<bool> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = format!("{holder}@{:?}", spec.renew_time);
        let first_seen = match &self.seen {
            Some((r, at)) if *r == record => *at,
            _ => {
                self.seen = Some((record, Instant::now()));
                Instant::now()
            }
        };
        let ours = holder == self.identity;
        let expired = holder.is_empty() || first_seen.elapsed() >= self.duration;
        if !ours && !expired {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            tracing::info!(lease = %self.name, previous = %holder, identity = %self.identity, "taking over the leader Lease");
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        conflict_is_false(self.api.replace(&self.name, &PostParams::default(), &lease).await)
    }
}

fn conflict_is_false(result: kube::Result<Lease>) -> kube::Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
