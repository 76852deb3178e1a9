//! The names turnout writes into the cluster: labels, annotations and their values (DESIGN §3).

/// Labels turnout reads or writes.
pub mod labels {
    /// Namespace opt-in label; its value must be [`super::values::ENABLED`].
    pub const ROLLOUT: &str = "turnout.dev/rollout";
    /// Pod-template label carrying the revision number of the template.
    pub const REVISION: &str = "turnout.dev/revision";
    /// Pod-template label Istio telemetry and Kiali read; stamped `v<N>` only when the user has none.
    pub const VERSION: &str = "version";
}

/// Annotations turnout reads or writes on Deployments and namespaces.
pub mod annotations {
    /// Per-Deployment opt-out: `turnout.dev/rollout: disabled`.
    pub const ROLLOUT: &str = "turnout.dev/rollout";
    /// The revision counter: the highest revision turnout has issued for this Deployment.
    pub const REVISION: &str = "turnout.dev/revision";
    /// Present (`"true"`) when the template's `version` label was stamped by turnout, not written by the
    /// user; tells a later request whether that label is ours to replace.
    pub const VERSION_STAMPED: &str = "turnout.dev/version-stamped";
    /// Release intent: the revision that serves traffic while a release is in flight (`0`: a template
    /// from before turnout, which carries no stamps).
    pub const STABLE_REVISION: &str = "turnout.dev/stable-revision";
    /// Release intent: hash of the stable template with turnout's stamps removed.
    pub const STABLE_HASH: &str = "turnout.dev/stable-hash";
    /// Release status, written by the agent only.
    pub const PHASE: &str = "turnout.dev/phase";
    /// Release status: the candidate's current traffic weight.
    pub const WEIGHT: &str = "turnout.dev/weight";
    /// Release status: number of failed analysis checks.
    pub const FAILED_CHECKS: &str = "turnout.dev/failed-checks";
    /// Release status: a human-readable message.
    pub const MESSAGE: &str = "turnout.dev/message";
    /// Release status: analyses passed in an A/B test.
    pub const ITERATION: &str = "turnout.dev/iteration";
    /// Release status: the revision the phase, weight and failed checks are about.
    pub const RELEASE: &str = "turnout.dev/release";
    /// Release status: `"true"` while the release is paused on request (`turnout pause`).
    pub const RELEASE_PAUSED: &str = "turnout.dev/release-paused";
    /// Release status: the routing provider the release moves traffic with (`istio`, `gateway-api`).
    pub const ROUTING: &str = "turnout.dev/routing";
    /// Release status: the strategy of the release (`canary`, `ab`, `blue-green`), kept until it ends.
    pub const RELEASE_STRATEGY: &str = "turnout.dev/release-strategy";
    /// A person's request for the release in flight, `<verb>@<release>` (`abort@3`), written by
    /// `turnout promote|abort|retry|pause|resume` and removed by the agent once acted on or refused.
    pub const REQUEST: &str = "turnout.dev/request";

    /// Annotations only turnout writes. An update that drops or edits them gets them back from the
    /// stored object, so a `kubectl replace` or a GitOps sync cannot lose a release's state.
    pub const OWNED: [&str; 13] = [
        REVISION,
        VERSION_STAMPED,
        STABLE_REVISION,
        STABLE_HASH,
        PHASE,
        WEIGHT,
        FAILED_CHECKS,
        ITERATION,
        MESSAGE,
        RELEASE,
        RELEASE_PAUSED,
        ROUTING,
        RELEASE_STRATEGY,
    ];
    /// The annotations that describe a release in flight or its status; a CREATE starts without them.
    pub const RELEASE_STATE: [&str; 12] = [
        STABLE_REVISION,
        STABLE_HASH,
        PHASE,
        WEIGHT,
        FAILED_CHECKS,
        ITERATION,
        MESSAGE,
        RELEASE,
        RELEASE_PAUSED,
        ROUTING,
        RELEASE_STRATEGY,
        REQUEST,
    ];
}

/// Values of the labels and annotations above.
pub mod values {
    /// Namespace opt-in value of [`super::labels::ROLLOUT`].
    pub const ENABLED: &str = "enabled";
    /// Per-Deployment opt-out value of [`super::annotations::ROLLOUT`].
    pub const DISABLED: &str = "disabled";
    /// Value of [`super::annotations::VERSION_STAMPED`].
    pub const TRUE: &str = "true";
}

/// The `version` label value turnout stamps for revision `n`.
pub fn version_label(revision: u64) -> String {
    format!("v{revision}")
}

/// Labels and names of the objects the agent creates.
pub mod agent {
    /// Pod label that tells a candidate's pods from the user Deployment's.
    pub const TRACK: &str = "turnout.dev/track";
    /// Value of [`TRACK`] on candidate pods.
    pub const CANDIDATE: &str = "candidate";
    /// Label on the candidate Deployment naming the user Deployment it belongs to.
    pub const RELEASE_OF: &str = "turnout.dev/release-of";
    /// Label on VirtualServices and DestinationRules turnout manages.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Value of [`MANAGED_BY`].
    pub const TURNOUT: &str = "turnout";
    /// Annotation on a managed VirtualService or DestinationRule: when turnout last changed its spec
    /// (RFC 3339), from which propagation and drain windows are counted, also after a restart.
    pub const CHANGED_AT: &str = "turnout.dev/changed-at";
    /// Annotation on a candidate Deployment: the hash of the user Deployment's pod template it was made
    /// from (stamps removed), to notice a template changed without turnout's hold during the release.
    pub const TEMPLATE_HASH: &str = "turnout.dev/template-hash";
    /// Annotation on a held candidate Deployment (blue/green without a mesh): the labels the Service
    /// selects that its pod template lacks, as a JSON object; its pods carry them only while it serves.
    pub const WITHHELD_LABELS: &str = "turnout.dev/withheld-labels";
    /// The label every ReplicaSet's pods carry, which Istio subsets select on.
    pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
}

/// The Deployment status condition turnout writes and reads, which `kubectl rollout status` follows.
pub mod conditions {
    /// The condition's type.
    pub const PROGRESSING: &str = "Progressing";
    /// Reason of a failed rollout (`status: "False"`): `kubectl rollout status` exits non-zero.
    pub const DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    /// Reason the Deployment controller gives a paused Deployment (`status: "Unknown"`).
    pub const PAUSED: &str = "DeploymentPaused";
}

/// Name of the candidate Deployment of release `revision` of Deployment `name`.
pub fn candidate_name(name: &str, revision: u64) -> String {
    format!("{name}-v{revision}")
}

/// Backend names (DESIGN §3; Istio subsets, Gateway API per-version Services): the stable
/// ReplicaSet, the candidate, the user Deployment's new ReplicaSet.
pub mod backends {
    /// `v<M>`: a ReplicaSet of the user's Deployment at revision `m`.
    pub fn revision(m: u64) -> String {
        format!("v{m}")
    }
    /// `v<N>-canary`: the candidate of release `n`.
    pub fn canary(n: u64) -> String {
        format!("v{n}-canary")
    }

    /// The per-version Service of `backend` for Service `service` (Gateway API): `<service>-<backend>`,
    /// e.g. `podinfo-v3-canary`. A name longer than a Service name may be (63) is cut and given a
    /// hash of the whole, so two long names stay distinct.
    pub fn service(service: &str, backend: &str) -> String {
        const MAX: usize = 63;
        let name = format!("{service}-{backend}");
        if name.len() <= MAX {
            return name;
        }
        let sha = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
        let digest: String = sha.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
        let keep = MAX - digest.len() - 1;
        let mut cut = name[..keep].trim_end_matches('-').to_owned();
        cut.push('-');
        cut.push_str(&digest);
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::backends;

    #[test]
    fn per_version_service_names_are_valid_and_distinct() {
        assert_eq!(backends::service("podinfo", &backends::canary(3)), "podinfo-v3-canary");
        let long = "a".repeat(60);
        let (one, two) = (backends::service(&long, "v1"), backends::service(&long, "v2"));
        assert!(one.len() <= 63 && two.len() <= 63, "{one} {two}");
        assert_ne!(one, two);
        assert!(one.starts_with("aaaa") && !one.contains("--"));
    }
}
