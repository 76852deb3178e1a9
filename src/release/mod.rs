//! The release state machine (DESIGN §2, §5): a pure function from what is observed in the cluster,
//! plus the time, to the one next action.
//!
//! ```text
//!  Pending ─▶ Progressing ─▶ Promoting ─▶ HandingOff ─▶ Finalising ─▶ Succeeded
//!     │            │              │
//!     └────────────┴──────────────┴──▶ Failed (rolled back, D stays paused on the failed template)
//!  revert of the template to the stable one, at any point ─▶ RolledBack
//!  opted out before hand-off (namespace label removed, Deployment disabled) ─▶ unwound ─▶ HandedBack
//!  new template during a release ─▶ the old candidate is unwound, the new release starts at Pending
//! ```
//!
//! Nothing is remembered between calls: everything the machine needs is in the cluster (the
//! Deployment's annotations, the candidate, the routing objects with their `changed-at` annotation:
//! [`routing`]). An agent that restarts at any point carries on from there, and one action
//! per call means a crash between two writes loses nothing.

mod plan;
pub mod reasons;
pub mod routing;
#[cfg(test)]
mod sim;

pub use plan::{admissible, plan};
pub use routing::{
    Applied, Backend, Caps, HostRouting, Managed, ProviderKind, Route, RoutingAction, Synced, Weighted,
    candidate_replicas,
};

use crate::config::{HookKind, ReleaseConfig};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// The phase of a release, as written to `turnout.dev/phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Held; stable subset and candidate being prepared.
    Pending,
    /// Traffic moving to the candidate step by step, with analysis.
    Progressing,
    /// 100 % on the candidate; waiting for the drain window before unpausing the Deployment.
    Promoting,
    /// The Deployment is unpaused and replaces its pods while they carry no traffic.
    HandingOff,
    /// Traffic moves to the Deployment's new ReplicaSet; the candidate and old subsets are removed.
    Finalising,
    /// The release completed.
    Succeeded,
    /// Rolled back on failed analysis or a deadline; the Deployment stays paused on the failed template.
    Failed,
    /// The template was set back to the stable one and the release was unwound.
    RolledBack,
    /// Opted out during the release (the namespace's label removed, or the Deployment annotated
    /// `turnout.dev/rollout: disabled`): unwound and the Deployment handed back unpaused, for its own
    /// controller to roll out its template.
    HandedBack,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Pending,
        Phase::Progressing,
        Phase::Promoting,
        Phase::HandingOff,
        Phase::Finalising,
        Phase::Succeeded,
        Phase::Failed,
        Phase::RolledBack,
        Phase::HandedBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Progressing => "Progressing",
            Phase::Promoting => "Promoting",
            Phase::HandingOff => "HandingOff",
            Phase::Finalising => "Finalising",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::RolledBack => "RolledBack",
            Phase::HandedBack => "HandedBack",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Before the Deployment is unpaused: the phases a request can still pause, promote or abort.
    pub fn before_hand_off(self) -> bool {
        matches!(self, Phase::Pending | Phase::Progressing | Phase::Promoting)
    }

    /// Whether the release has ended (no further action unless the template changes).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::Failed | Phase::RolledBack | Phase::HandedBack
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a release moves traffic to the candidate (`turnout.dev/strategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Weighted steps (the requests that match, if any, on the candidate from the first step).
    #[default]
    Canary,
    /// The requests that match on the candidate, every other one on the stable version, for a number
    /// of analyses; then all traffic at once.
    AB,
    /// The candidate at the stable side's full size, analysed for a number of iterations on the
    /// requests that match, copies, or its readiness alone; then all traffic switched in one step, the
    /// stable pods kept for a rollback window before the hand-off.
    BlueGreen,
}

impl Strategy {
    /// The value of `turnout.dev/strategy`, and the metrics' label.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Canary => "canary",
            Strategy::AB => "ab",
            Strategy::BlueGreen => "blue-green",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        [Strategy::Canary, Strategy::AB, Strategy::BlueGreen]
            .into_iter()
            .find(|k| k.as_str() == s.trim())
    }
}

/// Everything the machine looks at.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub now: Millis,
    pub config: &'a ReleaseConfig,
    pub deployment: DeploymentView,
    /// The user Deployment's ReplicaSet of the stable revision (while a release is recorded).
    pub stable_rs: Option<ReplicaSetView>,
    /// The user Deployment's ReplicaSet of the template's revision (after hand-off).
    pub new_rs: Option<ReplicaSetView>,
    /// Candidate Deployments of this Deployment (normally at most one).
    pub candidates: Vec<CandidateView>,
    /// How traffic is moved for this Deployment.
    pub provider: ProviderKind,
    /// Routing for each Service that selects the Deployment's pods.
    pub hosts: Vec<HostRouting>,
    /// Why routing cannot be managed (the provider's CRDs missing), if so.
    pub routing_unavailable: Option<String>,
    /// The result of the analysis the previous call asked for ([`Action::Analyse`]).
    pub verdict: Option<Verdict>,
    /// The namespace no longer opts in, or the Deployment opts out: a release in flight is let go.
    pub opted_out: bool,
}

/// The user's Deployment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeploymentView {
    pub namespace: String,
    pub name: String,
    pub replicas: i32,
    pub paused: bool,
    /// Revision of the pod template (its `turnout.dev/revision` label; 0 when unstamped).
    pub template_revision: u64,
    /// The release intent written by the webhook: the stable revision.
    pub stable_revision: Option<u64>,
    /// The release status annotations.
    pub status: StatusView,
    /// The native controller has rolled out the current template: every replica updated and available.
    pub rollout_complete: bool,
    /// Its `Progressing` condition says the rollout failed (`ProgressDeadlineExceeded`), which
    /// `kubectl rollout status` reports.
    pub rollout_failed: bool,
    /// A person's request waiting to be acted on (`turnout.dev/request`).
    pub request: Option<Request>,
    /// Hash of the pod template with turnout's stamps removed, as a candidate records it.
    pub template_hash: String,
}

/// What a person can ask of a release in flight (`turnout promote|abort|retry|pause|resume`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    /// Skip the remaining steps and analysis: all traffic to the candidate, then hand off.
    Promote,
    /// Roll back now, as a failed analysis would.
    Abort,
    /// Start a failed release again from its first step.
    Retry,
    /// Hold the weight where it is: no analysis, no step, no hand-off, until resumed.
    Pause,
    /// Let a paused release go on.
    Resume,
}

impl Verb {
    pub const ALL: [Verb; 5] = [Verb::Promote, Verb::Abort, Verb::Retry, Verb::Pause, Verb::Resume];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Promote => "promote",
            Verb::Abort => "abort",
            Verb::Retry => "retry",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
        }
    }
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value of `turnout.dev/request`: `<verb>@<release>`, e.g. `abort@3`. Naming the release keeps a
/// request from acting on a newer release than the one the person looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Valid {
        verb: Verb,
        release: u64,
    },
    /// Not of that form (written by hand): refused and removed.
    Invalid(String),
}

impl Request {
    pub fn parse(value: &str) -> Request {
        let valid = value.trim().split_once('@').and_then(|(verb, release)| {
            let verb = Verb::ALL.into_iter().find(|v| v.as_str() == verb)?;
            let release = release.strip_prefix('v').unwrap_or(release).parse().ok()?;
            Some(Request::Valid { verb, release })
        });
        valid.unwrap_or_else(|| Request::Invalid(value.to_owned()))
    }

    /// The annotation value for `verb` on `release`.
    pub fn value(verb: Verb, release: u64) -> String {
        format!("{verb}@{release}")
    }
}

/// The release status annotations as stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusView {
    pub phase: Option<Phase>,
    pub release: Option<u64>,
    pub weight: u8,
    pub failed_checks: u32,
    /// Analyses passed in an A/B test.
    pub iteration: u32,
    /// Paused on request (`turnout pause`): the weight stays where it is until resumed.
    pub paused: bool,
}

/// A ReplicaSet of the user Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSetView {
    pub hash: String,
    pub ready: i32,
}

/// A candidate Deployment `D-v<N>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CandidateView {
    pub name: String,
    pub revision: u64,
    /// `pod-template-hash` of its ReplicaSet, once there is one.
    pub hash: Option<String>,
    /// Every replica ready and available.
    pub available: bool,
    /// Pods of the candidate that still exist (terminating ones included).
    pub pods: u32,
    /// Container restarts across its pods.
    pub restarts: u32,
    pub created_at: Millis,
    /// Deletion requested.
    pub deleting: bool,
    /// The hash of the user Deployment's template it was made from (`turnout.dev/template-hash`).
    pub template_hash: Option<String>,
    /// Without a mesh: the canary weight its replica count stands for (`turnout.dev/weight` on the
    /// candidate), and when it was last scaled.
    pub scale: Option<Scale>,
    /// Without a mesh, a candidate made out of the Service: its pods lack a label the Service selects
    /// (`turnout.dev/withheld-labels`) until its weight is above 0, and lose it again when the weight
    /// goes back to 0, before they stop.
    pub held: bool,
    /// Its replica count (`spec.replicas`).
    pub replicas: i32,
    /// When the last of its pods became ready (0: none is): without a mesh its endpoints spread from
    /// then.
    pub ready_at: Millis,
    /// Pods of a held candidate not placed as its weight says (in the Service at weight 0, or out of
    /// it above): a pod the ReplicaSet replaced, or a write cut short.
    pub misplaced: u32,
}

/// A candidate's size without a mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub weight: u8,
    pub at: Millis,
}

/// The outcome of one analysis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub passed: bool,
    /// What was checked, or what failed (`success rate 53.4% < 99%`).
    pub message: String,
}

/// The next thing to do, with an Event to record when it is done.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub action: Action,
    pub event: Option<Event>,
}

/// One write, one analysis, or a wait.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A routing write, carried out by the provider.
    Routing(RoutingAction),
    /// Create the candidate Deployment of the template's revision, with `replicas` (`None`: the
    /// Deployment's; without a mesh it starts empty and each step scales it, or at full size for
    /// blue/green). `held`: without a mesh, made out of the Service (its pods lack a label the Service
    /// selects until the weight puts it on).
    CreateCandidate {
        revision: u64,
        replicas: Option<i32>,
        held: bool,
    },
    /// Without a mesh: scale a candidate to `replicas`, its share of the pods for canary `weight`; the
    /// pods of a held one join the Service above weight 0 and leave it at 0 (keeping its size).
    ScaleCandidate { name: String, replicas: i32, weight: u8 },
    /// Without a mesh: put the pods of held candidate `name` in the Service (`serving`) or out of it,
    /// as its weight says, changing nothing else.
    PlaceCandidatePods { name: String, serving: bool },
    /// Delete a candidate Deployment (its pods go with it).
    DeleteCandidate { name: String },
    /// Write the release status (and possibly unpause, clear the intent, mark the rollout failed).
    Status(StatusPatch),
    /// Remove the request annotation (refused or already done; the Event says which).
    ClearRequest,
    /// Run the analysis checks of the candidate and call [`plan`] again with the verdict.
    Analyse { revision: u64, stage: Stage },
    /// Nothing to do until `until` (if given) or until something changes.
    Wait { until: Option<Millis>, reason: String },
}

/// What an analysis covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Before the first step: the `pre-rollout` hook only (no traffic to measure yet).
    PreRollout,
    /// At a step: readiness, metrics, custom checks and the `rollout` hook, and the
    /// `confirm-promotion` hook when passing leads to 100 %.
    Step { confirm: bool },
    /// A blue/green candidate at full size that no live request reaches: its readiness and the
    /// `rollout` hook (no metrics to measure), and the `confirm-promotion` hook before the switch.
    Standby { confirm: bool },
}

/// A write to the user Deployment.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusPatch {
    pub phase: Phase,
    pub release: u64,
    pub weight: u8,
    pub failed_checks: u32,
    /// Analyses passed in an A/B test.
    pub iteration: u32,
    pub message: String,
    /// Set `spec.paused: false` (hand-off).
    pub unpause: bool,
    /// What becomes of the release intent (`stable-revision`, `stable-hash`).
    pub intent: Intent,
    /// What to write to the Deployment's `Progressing` condition.
    pub rollout: Rollout,
    /// Paused on request.
    pub paused: bool,
    /// Remove the request annotation: this write acts on it.
    pub clear_request: bool,
    /// The routing provider the release uses (shown by `turnout status`).
    pub provider: ProviderKind,
    /// The strategy the release runs (shown by `turnout status`; kept while the release is in flight).
    pub strategy: Strategy,
}

impl StatusPatch {
    /// The notification hook this write sends, decided here for the agent and the model alike:
    /// `post-rollout` when it records release success, `rollback` when it records a failure — on the
    /// write that records it (the status was something else `before`), never on a repeat.
    pub fn notifies(&self, before: &StatusView) -> Option<HookKind> {
        let kind = match self.phase {
            Phase::Succeeded => HookKind::PostRollout,
            Phase::Failed => HookKind::Rollback,
            Phase::Pending
            | Phase::Progressing
            | Phase::Promoting
            | Phase::HandingOff
            | Phase::Finalising
            | Phase::RolledBack
            | Phase::HandedBack => return None,
        };
        (before.phase != Some(self.phase) || before.release != Some(self.release)).then_some(kind)
    }
}

/// A change to the Deployment's `Progressing` status condition, which `kubectl rollout status` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rollout {
    Keep,
    /// `Progressing=False, reason ProgressDeadlineExceeded` with the message: the rollout failed.
    Fail,
    /// `Progressing=Unknown, reason DeploymentPaused`: a retried release is in progress again.
    Restart,
}

/// A change to the release intent the webhook wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    Keep,
    /// Removed: the release ended and needs nothing more.
    Clear,
    /// Revision `n`, with the hash of the Deployment's current template, becomes the stable one: the
    /// Deployment runs it, so a change from here on is a release from it (and a template set back to
    /// the old stable one is a new release, not a revert).
    Stable(u64),
}

/// A Kubernetes Event on the user Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}
