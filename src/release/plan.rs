//! [`plan`]: the next action of a release, from what is observed.
//!
//! Each phase is a list of conditions to establish in order; the first one that does not hold yet
//! gives the action. The same few helpers keep the invariants for every phase:
//!
//! - [`ensure_route`] defines backends and waits for them to propagate before a route names them
//!   (I1), changes one route at a time, and only writes weights summing to 100 (I4);
//! - [`remove_strays`] takes traffic off a candidate, waits the propagation delay and the drain window,
//!   and only then deletes it (I3, I6);
//! - [`to_rest`] removes backends only once no route names them and that change has propagated and
//!   drained (I2), and routes to the host only when no candidate pod is left for it to select (I3).

use super::reasons;
use super::routing::{Matched, Mirror, Split, Sticky, describe_matches};
use super::routing::{ProviderKind, Synced};
use super::{
    Action, Applied, Backend, CandidateView, DeploymentView, Event, HostRouting, Intent, Managed, Millis, Observed,
    Phase, Plan, Request, Rollout, Route, RoutingAction, Stage, StatusPatch, Strategy, Verb, Weighted,
    candidate_replicas,
};
use crate::config::HookKind;
use crate::names::{backends, candidate_name};

/// The next action for the Deployment described by `o`.
pub fn plan(o: &Observed<'_>) -> Plan {
    if let Some(plan) = misplaced(o) {
        return plan;
    }
    if o.opted_out && !past_hand_off(&o.deployment) && !on_candidate_baseline(o) {
        return opted_out(o);
    }
    managed(o)
}

/// Without a mesh, the pods of a held candidate are placed as its recorded weight says, whatever the
/// phase: in the Service above 0, out of it at 0 (a pod its ReplicaSet replaced has the template's
/// labels, which the Service does not select; a write may have been cut short).
fn misplaced(o: &Observed<'_>) -> Option<Plan> {
    let c = o.candidates.iter().find(|c| c.held && !c.deleting && c.misplaced > 0)?;
    Some(Plan {
        action: Action::PlaceCandidatePods {
            name: c.name.clone(),
            serving: scaled_weight(c) > 0,
        },
        event: None,
    })
}

/// The way back is a previous candidate, not the stable ReplicaSet (a release superseded during its
/// hand-off): there are no stable pods to unwind to, so an opted-out release finishes instead.
fn on_candidate_baseline(o: &Observed<'_>) -> bool {
    baseline(o, abandoned(&o.deployment)).is_some_and(|(_, from)| from.is_some())
}

/// The release recorded in flight that opting out abandons (none when it is the stable revision).
fn abandoned(d: &DeploymentView) -> Option<u64> {
    d.status.release.filter(|r| Some(*r) != d.stable_revision)
}

/// The Deployment's own controller is rolling the release out already (hand-off and after).
fn past_hand_off(d: &DeploymentView) -> bool {
    d.stable_revision.is_some()
        && d.status.release == Some(d.template_revision)
        && matches!(d.status.phase, Some(Phase::HandingOff | Phase::Finalising))
}

/// Opted out during a release (the namespace's label removed, or the Deployment annotated
/// `turnout.dev/rollout: disabled`): a release in flight must still end, and turnout lets go of it.
/// Before hand-off it is unwound as a revert is — traffic back on the stable pods, candidates drained
/// and deleted, the routes at rest — and then the Deployment is handed back unpaused with the intent
/// cleared, for its own controller to roll out the template it holds (what opting out asks for). From
/// hand-off on that controller is already rolling it out, and the release finishes as usual (so it does
/// when there are no stable pods to unwind to: [`on_candidate_baseline`]).
fn opted_out(o: &Observed<'_>) -> Plan {
    let d = &o.deployment;
    if d.request.is_some() {
        return refuse(
            o,
            format!(
                "{}/{} has opted out of turnout: requests are not taken",
                d.namespace, d.name
            ),
        );
    }
    let abandoned = abandoned(d);
    if let Some(plan) = remove_strays(o, None, abandoned).or_else(|| to_rest(o)) {
        return plan;
    }
    if d.stable_revision.is_none() && !d.paused {
        return wait(None, "opted out: not managed by turnout");
    }
    let message = match abandoned {
        Some(r) => format!(
            "release v{r} unwound: {}/{} opted out of turnout; its own controller rolls out its template",
            d.namespace, d.name
        ),
        None => format!(
            "{}/{} opted out of turnout; its own controller rolls out its template",
            d.namespace, d.name
        ),
    };
    Plan {
        action: Action::Status(StatusPatch {
            unpause: d.paused,
            intent: Intent::Clear,
            ..patch(
                o,
                abandoned.unwrap_or(d.template_revision),
                Phase::HandedBack,
                0,
                d.status.failed_checks,
                message.clone(),
            )
        }),
        event: Some(warning(reasons::HANDED_BACK, message)),
    }
}

/// The next action while the Deployment is managed.
fn managed(o: &Observed<'_>) -> Plan {
    let d = &o.deployment;
    let Some(stable) = d.stable_revision else {
        return requested(o).unwrap_or_else(|| at_rest(o));
    };
    let t = d.template_revision;
    if t == stable {
        // From Finalising on, the release's revision is the stable one (the Deployment runs it).
        return match (d.status.release == Some(t), d.status.phase) {
            (true, Some(Phase::Finalising)) => requested(o).unwrap_or_else(|| finalising(o, t)),
            (true, Some(Phase::Succeeded)) => requested(o).unwrap_or_else(|| succeeded(o, t)),
            // A request waits for the revert to be recorded, and is then refused.
            (false, _)
            | (
                true,
                None
                | Some(
                    Phase::Pending
                    | Phase::Progressing
                    | Phase::Promoting
                    | Phase::HandingOff
                    | Phase::Failed
                    | Phase::RolledBack
                    | Phase::HandedBack,
                ),
            ) => reverted(o, stable),
        };
    }
    let status = &d.status;
    if status.release != Some(t) {
        return start(o, t);
    }
    if let Some(plan) = requested(o) {
        return plan;
    }
    match status.phase {
        None | Some(Phase::Pending) => pending(o, t),
        Some(Phase::Progressing) => progressing(o, t),
        Some(Phase::Promoting) => promoting(o, t),
        Some(Phase::HandingOff) => handing_off(o, t),
        Some(Phase::Finalising) => finalising(o, t),
        Some(Phase::Succeeded) => succeeded(o, t),
        Some(Phase::Failed | Phase::RolledBack | Phase::HandedBack) => failed(o, t),
    }
}

/// Whether `verb` can act on the release of `d` now: the release it applies to, or why not. The CLI
/// asks before it writes a request, and the agent again when it reads it (the release may have moved on
/// in between), so both give the same reasons.
pub fn admissible(d: &DeploymentView, verb: Verb) -> Result<u64, String> {
    let name = format!("{}/{}", d.namespace, d.name);
    let last = match (d.status.release, d.status.phase) {
        (Some(r), Some(p)) => format!(" (release v{r}: {p})"),
        _ => String::new(),
    };
    let (Some(_), Some(t)) = (d.stable_revision, d.status.release) else {
        return Err(format!("{name} has no release in flight{last}"));
    };
    let phase = d.status.phase.unwrap_or(Phase::Pending);
    let early = phase.before_hand_off();
    let admitted = match verb {
        Verb::Abort | Verb::Promote => early,
        Verb::Pause => early && !d.status.paused,
        Verb::Resume => early && d.status.paused,
        Verb::Retry => phase == Phase::Failed,
    };
    if admitted {
        return Ok(t);
    }
    Err(match verb {
        Verb::Pause if early => format!("release v{t} of {name} is already paused"),
        Verb::Resume if early => format!("release v{t} of {name} is not paused"),
        Verb::Retry if !phase.is_final() => format!("release v{t} of {name} has not failed: it is {phase}"),
        Verb::Abort | Verb::Promote | Verb::Pause | Verb::Resume | Verb::Retry if phase.is_final() => {
            format!("release v{t} of {name} has ended: {phase}")
        }
        Verb::Abort => format!(
            "release v{t} of {name} is past the point of no return: {} is rolling it out ({phase}); set the \
             template back to roll back",
            d.name
        ),
        // Past hand-off and not ended (a retry is refused above either way).
        Verb::Promote | Verb::Pause | Verb::Resume | Verb::Retry => {
            format!("release v{t} of {name} is already promoted: {phase}")
        }
    })
}

/// A person's request (`turnout promote|abort|retry|pause|resume`) acted on, or refused, and removed.
/// `None` when there is none, or the phase acts on it itself (promote; retry once the unwinding is done).
fn requested(o: &Observed<'_>) -> Option<Plan> {
    let d = &o.deployment;
    let (verb, r) = match d.request.as_ref()? {
        Request::Valid { verb, release } => (*verb, *release),
        Request::Invalid(raw) => {
            return Some(refuse(
                o,
                format!(
                    "invalid request {raw:?} in turnout.dev/request: expected <verb>@<release> (e.g. abort@3), \
                     verb one of promote, abort, retry, pause, resume"
                ),
            ));
        }
    };
    let phase = d.status.phase.unwrap_or(Phase::Pending);
    if !d.paused && phase.before_hand_off() {
        // Resumed behind turnout's back: the safety net goes first.
        return None;
    }
    let t = match admissible(d, verb) {
        Ok(t) if t == r => t,
        Ok(t) => return Some(refuse(o, format!("{verb} of v{r} ignored: release v{t} is in flight"))),
        Err(why) => return Some(refuse(o, format!("{verb} of v{r} refused: {why}"))),
    };
    let who = format!("{}/{}", d.namespace, d.name);
    let (weight, failed) = (d.status.weight, d.status.failed_checks);
    let acted = |patch: StatusPatch, reason: &'static str, message: String| Plan {
        action: Action::Status(StatusPatch {
            clear_request: true,
            ..patch
        }),
        event: Some(info(reason, format!("{who}: {message}"))),
    };
    match verb {
        Verb::Abort => {
            let mut plan = fail(o, t, failed, "aborted on request".into());
            if let Action::Status(patch) = &mut plan.action {
                patch.clear_request = true;
            }
            Some(plan)
        }
        Verb::Pause | Verb::Resume => {
            let (paused, reason, done) = if verb == Verb::Pause {
                (true, reasons::PAUSED, "paused")
            } else {
                (false, reasons::RESUMED, "resumed")
            };
            let message = format!("{done} on request at canary weight {weight}");
            let patch = StatusPatch {
                paused,
                ..patch(o, t, phase, weight, failed, message.clone())
            };
            Some(acted(patch, reason, message))
        }
        Verb::Promote if phase == Phase::Promoting => {
            let message = format!("release v{t} promoted on request");
            let promoted = StatusPatch {
                paused: false,
                ..patch(o, t, phase, weight, failed, message.clone())
            };
            Some(acted(promoted, reasons::PROMOTING, message))
        }
        // Progressing moves all traffic to the candidate, then records Promoting.
        Verb::Promote => None,
        Verb::Retry => {
            if remove_strays(o, None, Some(t)).or_else(|| to_rest(o)).is_some() {
                // Still unwinding the failed attempt.
                return None;
            }
            let message = format!("release v{t} retried on request");
            let retried = patch(o, t, Phase::Pending, 0, 0, message.clone());
            Some(acted(retried, reasons::RETRYING, message))
        }
    }
}

/// Removes a request that cannot be acted on, saying why.
fn refuse(o: &Observed<'_>, why: String) -> Plan {
    let d = &o.deployment;
    Plan {
        action: Action::ClearRequest,
        event: Some(warning(
            reasons::REQUEST_REFUSED,
            format!("{}/{}: {why}", d.namespace, d.name),
        )),
    }
}

/// A promotion of release `t` was requested (acted on in `Progressing`).
fn promote_requested(o: &Observed<'_>, t: u64) -> bool {
    o.deployment.request
        == Some(Request::Valid {
            verb: Verb::Promote,
            release: t,
        })
}

/// The first step: all of it when a promotion was requested; none of the weight in an A/B test (only
/// the requests that match).
fn first_step(o: &Observed<'_>, t: u64) -> u8 {
    if promote_requested(o, t) {
        return 100;
    }
    if o.config.strategy != Strategy::Canary {
        return 0;
    }
    o.config.steps.first().copied().unwrap_or(100)
}

/// A blue/green release of `t` before its switch (a promotion asked for switches at once).
fn standing_by(o: &Observed<'_>, t: u64) -> bool {
    o.config.strategy == Strategy::BlueGreen && !promote_requested(o, t)
}

/// The route of a blue/green candidate on standby: every answer from the stable version; the requests
/// that match, if any, to the candidate, and copies of the mirror share, if any. `None` once routed.
fn standby_route(o: &Observed<'_>, t: u64, stable: &Backend, canary: &Backend) -> Option<Plan> {
    let matched = (!o.config.matches.is_empty()).then_some(canary);
    let mirror = o.config.mirror.is_some().then_some(canary);
    let Some(mut plan) = ensure_split(o, &[(stable.clone(), 100)], matched, mirror, None) else {
        // On readiness alone the route stays as it is: the candidate's backend is defined instead
        // (the switch is then one route change), and its propagation starts the standby.
        return if standby_measured(o) {
            None
        } else {
            define_backend(o, canary)
        };
    };
    if moves_traffic(&plan.action) {
        plan.event = Some(standby_event(o, t));
    }
    Some(plan)
}

/// The Event of a blue/green standby's start.
fn standby_event(o: &Observed<'_>, t: u64) -> Event {
    let d = &o.deployment;
    info(
        reasons::BLUE_GREEN,
        format!(
            "Blue/green of {}/{}: {} at full size, {}; every answer from the stable version",
            d.namespace,
            d.name,
            candidate_name(&d.name, t),
            standby_basis(o)
        ),
    )
}

/// Makes every managed host define backend `b` (no route names it yet), and waits for that to
/// propagate.
fn define_backend(o: &Observed<'_>, b: &Backend) -> Option<Plan> {
    if !weighted(o) {
        return None;
    }
    o.hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| matches!(h.backends, Managed::Ours(_)))
        .find_map(|(host, h)| define_on(o, host, &h.backends, std::slice::from_ref(b)))
}

/// Makes host `host`, whose backends are `backends`, define every one of `want`, and waits for that
/// to propagate (I1: before a route names them). `None` once they are all usable.
fn define_on(
    o: &Observed<'_>,
    host: usize,
    backends: &Managed<Applied<Vec<Backend>>>,
    want: &[Backend],
) -> Option<Plan> {
    let (defined, defined_at) = match backends {
        Managed::Ours(defs) => (defs.value.as_slice(), defs.propagated(ms(o.config.propagation_delay))),
        Managed::Absent | Managed::Foreign { .. } => (&[][..], 0),
    };
    let missing: Vec<Backend> = want
        .iter()
        .filter(|s| !defined.iter().any(|d| d.name == s.name))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let mut backends = defined.to_vec();
        backends.extend(missing);
        return Some(Plan {
            action: Action::Routing(RoutingAction::PutBackends { host, backends }),
            event: None,
        });
    }
    (defined_at > o.now).then(|| wait(Some(defined_at), "waiting for the new backend to propagate"))
}

/// When the last backend definition propagated (on any managed host).
fn backends_propagated(o: &Observed<'_>) -> Millis {
    let prop = ms(o.config.propagation_delay);
    o.hosts
        .iter()
        .filter_map(|h| match &h.backends {
            Managed::Ours(defs) => Some(defs.propagated(prop)),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// What a blue/green candidate on standby is analysed on.
fn standby_basis(o: &Observed<'_>) -> String {
    let mut on = Vec::new();
    if !o.config.matches.is_empty() {
        on.push(format!("requests matching {}", describe_matches(&o.config.matches)));
    }
    if let Some(percent) = o.config.mirror {
        on.push(format!("copies of {percent} % of the requests"));
    }
    if on.is_empty() {
        "on its readiness alone (no live request reaches it)".into()
    } else {
        format!("on {}", on.join(" and "))
    }
}

/// A blue/green candidate on standby gets traffic to measure (matched requests or copies).
fn standby_measured(o: &Observed<'_>) -> bool {
    !o.config.matches.is_empty() || o.config.mirror.is_some()
}

/// The standby route of a blue/green release with matches or copies is on every managed host (a
/// standby on readiness alone routes nothing new: only its status tells it apart).
fn standby_routed(o: &Observed<'_>, canary: &str) -> bool {
    o.config.strategy == Strategy::BlueGreen
        && standby_measured(o)
        && routed_everywhere(o, |r| {
            (o.config.matches.is_empty() || r.matched_backend() == Some(canary))
                && (o.config.mirror.is_none() || r.mirror_backend() == Some(canary))
                && r.weight_of(canary) == 0
        })
}

/// Some host's route is turnout's, and every route of turnout's is `routed`.
fn routed_everywhere(o: &Observed<'_>, routed: impl Fn(&Route) -> bool) -> bool {
    o.hosts.iter().any(|h| matches!(h.route, Managed::Ours(_)))
        && o.hosts.iter().all(|h| match &h.route {
            Managed::Ours(r) => routed(&r.value),
            _ => true,
        })
}

/// The status of blue/green release `t` on standby, after `iteration` passed analyses.
fn at_standby(o: &Observed<'_>, t: u64, iteration: u32, event: Option<Event>) -> Plan {
    let message = format!(
        "Blue/green iteration {iteration}/{}: {} at full size, {}",
        o.config.iterations,
        candidate_name(&o.deployment.name, t),
        standby_basis(o)
    );
    Plan {
        action: Action::Status(StatusPatch {
            iteration,
            ..patch(o, t, Phase::Progressing, 0, o.deployment.status.failed_checks, message)
        }),
        event,
    }
}

/// Blue/green release `t` passed its iterations: all traffic to the candidate in one route change.
fn switch(o: &Observed<'_>, t: u64, canary: &Backend) -> Option<Plan> {
    let mut plan = ensure_split(o, &[(canary.clone(), 100)], None, None, None)?;
    if moves_traffic(&plan.action) {
        let d = &o.deployment;
        plan.event = Some(info(
            reasons::SWITCHED,
            format!(
                "{} {}/{} to v{t} after {} iterations{}; v{} stays at full size for a rollback for {}",
                if weighted(o) {
                    "Switched all traffic (blue/green) of"
                } else {
                    "Switched (blue/green)"
                },
                d.namespace,
                d.name,
                d.status.iteration,
                beside_stable(o, t).map(|b| format!(": {b}")).unwrap_or_default(),
                stable_revision(o),
                humantime::format_duration(o.config.drain)
            ),
        ));
    }
    Some(plan)
}

/// What the switch of blue/green release `t` did. With a router every request goes to the candidate;
/// without a mesh the Service still selects the stable pods, so its pods joined them, all at once,
/// each version getting its share of the pods until the hand-off replaces the stable ones.
fn switched_to(o: &Observed<'_>, t: u64) -> String {
    match beside_stable(o, t) {
        None => format!("Switched all traffic (blue/green) to v{t}"),
        Some(beside) => format!("Switched (blue/green) to v{t}: {beside}"),
    }
}

/// Without a mesh, where a switched blue/green candidate's pods are.
fn beside_stable(o: &Observed<'_>, t: u64) -> Option<String> {
    (!weighted(o)).then(|| {
        let stable = stable_revision(o);
        format!(
            "all of {}'s pods joined the Service beside v{stable}'s (without a mesh each version serves its \
             share of the pods until the hand-off replaces v{stable}'s)",
            candidate_name(&o.deployment.name, t),
        )
    })
}

/// Blue/green after the switch (not on a promotion asked for): the stable pods wait for a rollback
/// while the analyses go on.
fn switched(o: &Observed<'_>, t: u64, weight: u8) -> bool {
    weight >= 100 && o.config.strategy == Strategy::BlueGreen && !promote_requested(o, t)
}

/// Blue/green, all traffic on the candidate: until when the stable pods wait for a rollback (the
/// drain window after the switch propagated), while the analyses go on.
fn rollback_window(o: &Observed<'_>) -> Millis {
    last_route_change(o) + ms(o.config.propagation_delay) + ms(o.config.drain)
}

/// The release mirrors before its first step, and has not finished mirroring.
fn mirror_due(o: &Observed<'_>, t: u64) -> bool {
    o.config.mirror.is_some()
        && o.config.strategy == Strategy::Canary
        && !promote_requested(o, t)
        && (o.deployment.status.release != Some(t) || o.deployment.status.iteration < o.config.iterations)
}

/// The mirror stage is routed: copies go to `canary` on every managed host.
fn mirror_routed(o: &Observed<'_>, canary: &str) -> bool {
    o.config.mirror.is_some() && routed_everywhere(o, |r| r.mirror_backend() == Some(canary))
}

/// The first route of release `t`: copies to the candidate while it mirrors first, else the first
/// step.
fn first_route(o: &Observed<'_>, t: u64, stable: &Backend, canary: &Backend) -> Option<Plan> {
    if standing_by(o, t) {
        return standby_route(o, t, stable, canary);
    }
    if !mirror_due(o, t) {
        return advance(o, stable, canary, first_step(o, t));
    }
    let mut plan = ensure_split(o, &[(stable.clone(), 100)], None, Some(canary), None)?;
    if moves_traffic(&plan.action) {
        let d = &o.deployment;
        plan.event = Some(info(
            reasons::MIRROR,
            format!(
                "Mirroring {} % of {}/{}'s requests to {}: answers still from the stable version",
                o.config.mirror.unwrap_or(100),
                d.namespace,
                d.name,
                candidate_name(&d.name, t)
            ),
        ));
    }
    Some(plan)
}

/// The status of release `t` while it mirrors, after `iteration` passed analyses.
fn at_mirror(o: &Observed<'_>, t: u64, iteration: u32, event: Option<Event>) -> Plan {
    let message = format!(
        "Mirroring {} % to {} (iteration {iteration}/{})",
        o.config.mirror.unwrap_or(100),
        candidate_name(&o.deployment.name, t),
        o.config.iterations
    );
    Plan {
        action: Action::Status(StatusPatch {
            iteration,
            ..patch(o, t, Phase::Progressing, 0, o.deployment.status.failed_checks, message)
        }),
        event,
    }
}

/// An A/B test's stage is routed: the requests that match go to `canary` on every managed host.
fn ab_routed(o: &Observed<'_>, canary: &str) -> bool {
    o.config.strategy == Strategy::AB && routed_everywhere(o, |r| r.matched_backend() == Some(canary))
}

/// The status of release `t` in its A/B test, after `iteration` passed analyses.
fn at_iteration(o: &Observed<'_>, t: u64, iteration: u32, event: Option<Event>) -> Plan {
    let message = format!(
        "A/B iteration {iteration}/{} for {}",
        o.config.iterations,
        describe_matches(&o.config.matches)
    );
    Plan {
        action: Action::Status(StatusPatch {
            iteration,
            ..patch(o, t, Phase::Progressing, 0, o.deployment.status.failed_checks, message)
        }),
        event,
    }
}

/// The `pre-rollout` gate before the first step: the hook must pass; a failure counts as a failed
/// check, tried again an interval later, and `threshold` of them roll the release back.
fn pre_rollout(o: &Observed<'_>, t: u64) -> Option<Plan> {
    if !o.config.hooks.contains_key(&HookKind::PreRollout) || promote_requested(o, t) {
        return None;
    }
    let d = &o.deployment;
    let failed = d.status.failed_checks;
    let due = last_propagation(o) + ms(o.config.interval) * u64::from(failed);
    if o.now < due {
        return Some(wait(Some(due), "trying the pre-rollout hook again"));
    }
    let Some(verdict) = &o.verdict else {
        return Some(Plan {
            action: Action::Analyse {
                revision: t,
                stage: Stage::PreRollout,
            },
            event: None,
        });
    };
    if verdict.passed {
        return None;
    }
    let failed = failed + 1;
    if failed >= o.config.threshold {
        return Some(fail(
            o,
            t,
            failed,
            format!("{failed} failed checks: {}", verdict.message),
        ));
    }
    let message = format!("Halt before the first step: {}", verdict.message);
    Some(Plan {
        action: Action::Status(patch(o, t, Phase::Pending, 0, failed, message.clone())),
        event: Some(warning(reasons::HALT, format!("{}/{}: {message}", d.namespace, d.name))),
    })
}

/// Paused on request, and no promotion requested (which overrides the pause).
/// Paused on request, and not asked to promote. An opted-out release that finishes (it is past
/// hand-off, or has no stable pods to go back to) is not held: it must end, and no request of an
/// opted-out Deployment is taken to resume it.
fn held(o: &Observed<'_>, t: u64) -> bool {
    o.deployment.status.paused && !promote_requested(o, t) && !o.opted_out
}

fn at_rest(o: &Observed<'_>) -> Plan {
    remove_strays(o, None, None)
        .or_else(|| to_rest(o))
        .or_else(|| route_at_rest(o))
        .unwrap_or_else(|| wait(None, "at rest: no release in flight"))
}

/// A host whose route must exist at rest (attached to a gateway) and does not yet: created, to every
/// pod of the Service.
fn route_at_rest(o: &Observed<'_>) -> Option<Plan> {
    let d = &o.deployment;
    let (host, h) = o
        .hosts
        .iter()
        .enumerate()
        .find(|(_, h)| h.route_at_rest && h.route == Managed::Absent)?;
    Some(Plan {
        action: Action::Routing(RoutingAction::PutRoute {
            host,
            route: Route::Host,
        }),
        event: Some(info(
            reasons::ROUTING,
            format!(
                "{}/{}: {} is routed through {} at rest",
                d.namespace, d.name, h.service, o.provider
            ),
        )),
    })
}

/// The template is the stable one again: unwind without analysis, then record the rollback.
fn reverted(o: &Observed<'_>, stable: u64) -> Plan {
    let abandoned = o.deployment.status.release.filter(|r| *r != stable);
    if let Some(plan) = remove_strays(o, None, abandoned).or_else(|| to_rest(o)) {
        return plan;
    }
    let d = &o.deployment;
    let message = match abandoned {
        Some(r) => format!("release v{r} rolled back: the template was set back to v{stable}"),
        None => format!("back on v{stable}"),
    };
    Plan {
        action: Action::Status(StatusPatch {
            intent: Intent::Clear,
            ..patch(
                o,
                abandoned.unwrap_or(stable),
                Phase::RolledBack,
                0,
                d.status.failed_checks,
                message.clone(),
            )
        }),
        event: Some(info(reasons::ROLLED_BACK, format!("{}: {message}", d.name))),
    }
}

/// A new template: record the release (superseding the previous one, if any).
fn start(o: &Observed<'_>, t: u64) -> Plan {
    let d = &o.deployment;
    let superseded = d
        .status
        .release
        .filter(|r| *r != t && d.status.phase.is_some_and(|p| !p.is_final()));
    let message = match superseded {
        Some(r) => format!("release v{t} supersedes v{r}"),
        None => format!("release v{t} started"),
    };
    Plan {
        action: Action::Status(patch(o, t, Phase::Pending, 0, 0, message.clone())),
        event: Some(info(
            if superseded.is_some() {
                reasons::SUPERSEDED
            } else {
                reasons::STARTED
            },
            format!("{}/{}: {message} (routing: {})", d.namespace, d.name, o.provider),
        )),
    }
}

fn pending(o: &Observed<'_>, t: u64) -> Plan {
    if let Some(plan) = before_routing(o, t) {
        return plan;
    }
    let d = &o.deployment;
    let Some((stable, _)) = baseline(o, Some(t)) else {
        // Nothing serves traffic that could be lost (no Service, or no stable pods): release natively.
        let why = if o.hosts.is_empty() {
            format!("no Service selects the pods of {}", d.name)
        } else {
            format!("{} has no ready pods of v{} to protect", d.name, stable_revision(o))
        };
        return status(
            o,
            t,
            Phase::HandingOff,
            100,
            format!("{why}: rolling out v{t} natively"),
            true,
            Some(info(
                reasons::HANDING_OFF,
                format!("{}/{}: {why}; rolling out v{t} natively", d.namespace, d.name),
            )),
        );
    };
    if let Some(canary) = canary_backend(o, t) {
        let weight = current_weight(o, &canary.name);
        if weight > 0 {
            // The first step is routed; the status follows.
            return at_weight(o, t, weight);
        }
        if ab_routed(o, &canary.name) {
            return at_iteration(o, t, 0, None);
        }
        if standby_routed(o, &canary.name) {
            return at_standby(o, t, 0, None);
        }
        if o.config.strategy == Strategy::Canary && mirror_routed(o, &canary.name) {
            return at_mirror(o, t, 0, None);
        }
    }
    if let Some(plan) = ensure_route(o, &[(stable.clone(), 100)]) {
        return plan;
    }
    if let Some(until) = routes_settle(o, 0) {
        return wait(Some(until), "waiting for the route to the stable backend to propagate");
    }
    let Some(candidate) = candidate_of(o, t) else {
        if let Some(plan) = unaccepted(o, t) {
            return plan;
        }
        // Without a mesh it is made out of the Service (held): its pods get the label the Service
        // selects as its weight says, and lose it before they stop. A canary starts empty, and the
        // first step (after the pre-rollout gate) scales it; a blue/green candidate is made at full
        // size, and the switch puts its pods in.
        let held = !weighted(o);
        let replicas = if o.config.strategy == Strategy::BlueGreen {
            candidate_replicas(d.replicas, 100)
        } else {
            0
        };
        return Plan {
            action: Action::CreateCandidate {
                revision: t,
                replicas: (!weighted(o)).then_some(replicas),
                held,
            },
            event: Some(info(
                reasons::CANDIDATE,
                format!(
                    "{}/{}: creating candidate {}",
                    d.namespace,
                    d.name,
                    candidate_name(&d.name, t)
                ),
            )),
        };
    };
    let hash = match (&candidate.hash, candidate.available) {
        (Some(hash), true) => hash.clone(),
        _ => {
            let deadline = candidate.created_at + ms(o.config.progress_deadline);
            if o.now >= deadline {
                return fail(
                    o,
                    t,
                    o.deployment.status.failed_checks,
                    format!(
                        "candidate {} not available within {}",
                        candidate.name,
                        humantime::format_duration(o.config.progress_deadline)
                    ),
                );
            }
            return wait(
                Some(deadline),
                &format!("waiting for candidate {} to be available", candidate.name),
            );
        }
    };
    let canary = Backend {
        name: backends::canary(t),
        hash,
    };
    if held(o, t) {
        return wait(None, "paused on request before the first step");
    }
    match first_route(o, t, &stable, &canary) {
        // The canary backend is defined and propagated first; the gate is asked only right before the
        // route changes, in the same pass.
        Some(prepare) if !moves_traffic(&prepare.action) => prepare,
        step => pre_rollout(o, t).or(step).unwrap_or_else(|| {
            if standing_by(o, t) {
                // On readiness alone: nothing to route, the status tells the standby apart.
                return at_standby(o, t, 0, Some(standby_event(o, t)));
            }
            wait(None, "routing the first step")
        }),
    }
}

fn progressing(o: &Observed<'_>, t: u64) -> Plan {
    if let Some(plan) = before_routing(o, t).or_else(|| stalled(o, t)) {
        return plan;
    }
    let d = &o.deployment;
    let (Some((stable, stable_candidate)), Some(canary)) = (baseline(o, Some(t)), canary_backend(o, t)) else {
        return fail(
            o,
            t,
            o.deployment.status.failed_checks,
            format!("candidate {} disappeared", candidate_name(&d.name, t)),
        );
    };
    let weight = current_weight(o, &canary.name);
    let ab = weight == 0 && ab_routed(o, &canary.name);
    // A blue/green candidate on standby whose route is in place (put back first if it was undone).
    let standby = weight == 0 && standing_by(o, t);
    if standby && let Some(plan) = standby_route(o, t, &stable, &canary) {
        return plan;
    }
    let mirroring = weight == 0 && o.config.strategy == Strategy::Canary && !ab && mirror_routed(o, &canary.name);
    let switched = switched(o, t, weight);
    if weight == 0 && !ab && !mirroring && !standby {
        if held(o, t) {
            return wait(None, "paused on request before the first step");
        }
        // The status was written but the route was not (or was undone): take the first step again.
        return first_route(o, t, &stable, &canary).unwrap_or_else(|| wait(None, "routing the first step"));
    }
    if d.status.weight != weight {
        return at_weight(o, t, weight);
    }
    if mirroring && !mirror_due(o, t) {
        // Mirroring passed (or a promotion was asked for): the first live step.
        return advance(o, &stable, &canary, first_step(o, t)).unwrap_or_else(|| wait(None, "routing the first step"));
    }
    let promote = promote_requested(o, t);
    if promote && weight < 100 {
        return advance(o, &stable, &canary, 100).unwrap_or_else(|| wait(None, "promoting"));
    }
    let in_route: Vec<u64> = std::iter::once(t).chain(stable_candidate).collect();
    if let Some(until) = step_settles(o, &in_route) {
        return wait(Some(until), &format!("waiting for canary weight {weight} to propagate"));
    }
    if promote {
        let message = format!("release v{t} promoted on request: analysis skipped");
        return Plan {
            action: Action::Status(StatusPatch {
                paused: false,
                clear_request: true,
                ..patch(o, t, Phase::Promoting, 100, 0, message.clone())
            }),
            event: Some(info(
                reasons::PROMOTING,
                format!("{}/{}: {message}", d.namespace, d.name),
            )),
        };
    }
    if held(o, t) {
        return wait(None, &format!("paused on request at canary weight {weight}"));
    }
    if standby && d.status.iteration >= o.config.iterations {
        return switch(o, t, &canary).unwrap_or_else(|| wait(None, "switching all traffic"));
    }
    // One analysis an interval: in an A/B test (and the stages like it) the route stays, so every
    // analysis so far counts.
    let staged = ab || mirroring || standby || switched;
    let analyses = d.status.failed_checks + 1 + if staged { d.status.iteration } else { 0 };
    // A standby on readiness alone changed no route: it began when the candidate's backend was
    // defined.
    let since = if standby && !standby_measured(o) {
        last_propagation(o).max(backends_propagated(o))
    } else {
        last_propagation(o)
    };
    let due = since + ms(o.config.interval) * u64::from(analyses);
    if o.now < due {
        return wait(Some(due), &format!("analysing canary weight {weight}"));
    }
    let next = o.config.steps.iter().copied().find(|s| *s > weight).unwrap_or(100);
    let Some(verdict) = &o.verdict else {
        // The gate before 100 %: at the analysis whose pass leads there, or at 100 % when the first
        // step went straight there.
        let leads_to_all = if mirroring || switched {
            false
        } else if ab || standby {
            d.status.iteration + 1 >= o.config.iterations
        } else if weight < 100 {
            next >= 100
        } else {
            first_step(o, t) >= 100
        };
        let confirm = leads_to_all && o.config.hooks.contains_key(&HookKind::ConfirmPromotion);
        return Plan {
            action: Action::Analyse {
                revision: t,
                stage: if standby && !standby_measured(o) {
                    Stage::Standby { confirm }
                } else {
                    Stage::Step { confirm }
                },
            },
            event: None,
        };
    };
    if verdict.passed && mirroring {
        let passed = d.status.iteration + 1;
        let about = format!(
            "{}/{}: mirroring to {}, iteration {passed}/{}: {}",
            d.namespace,
            d.name,
            candidate_name(&d.name, t),
            o.config.iterations,
            verdict.message
        );
        if passed < o.config.iterations {
            return at_mirror(o, t, passed, Some(info(reasons::MIRROR, about)));
        }
        // Mirroring passed: the first live step comes next.
        let mut plan = at_mirror(o, t, passed, Some(info(reasons::MIRROR, about)));
        if let Action::Status(p) = &mut plan.action {
            p.message = format!("mirroring passed {passed} iterations; first step next");
        }
        return plan;
    }
    if verdict.passed && standby {
        let passed = d.status.iteration + 1;
        let about = format!(
            "{}/{}: blue/green iteration {passed}/{} of {}: {}",
            d.namespace,
            d.name,
            o.config.iterations,
            candidate_name(&d.name, t),
            verdict.message
        );
        let mut plan = at_standby(o, t, passed, Some(info(reasons::ITERATION, about)));
        if passed >= o.config.iterations
            && let Action::Status(p) = &mut plan.action
        {
            // The switch is the next pass's (it may need the candidate's backend defined first).
            p.message = format!("blue/green passed {passed} iterations; switching all traffic to v{t}");
        }
        return plan;
    }
    let window = rollback_window(o);
    if verdict.passed && switched && o.now < window {
        let passed = d.status.iteration + 1;
        let until = window - o.now;
        return Plan {
            action: Action::Status(StatusPatch {
                iteration: passed,
                ..patch(
                    o,
                    t,
                    Phase::Progressing,
                    100,
                    d.status.failed_checks,
                    format!(
                        "{}; v{} stays at full size for a rollback for another {} (analyses passed in the window: \
                         {passed})",
                        switched_to(o, t),
                        stable_revision(o),
                        humantime::format_duration(std::time::Duration::from_secs(until.div_ceil(1000)))
                    ),
                )
            }),
            event: None,
        };
    }
    if verdict.passed && ab {
        let passed = d.status.iteration + 1;
        let about = format!(
            "{}/{}: A/B iteration {passed}/{} for {}: {}",
            d.namespace,
            d.name,
            o.config.iterations,
            describe_matches(&o.config.matches),
            verdict.message
        );
        if passed < o.config.iterations {
            return at_iteration(o, t, passed, Some(info(reasons::ITERATION, about)));
        }
        // The test passed: all traffic to the candidate in one step (the promotion routes it).
        return Plan {
            action: Action::Status(StatusPatch {
                iteration: passed,
                ..patch(
                    o,
                    t,
                    Phase::Promoting,
                    100,
                    d.status.failed_checks,
                    format!(
                        "A/B test passed {passed} iterations; all traffic to the candidate, then handing off to {}",
                        d.name
                    ),
                )
            }),
            event: Some(info(
                reasons::PROMOTING,
                format!(
                    "{}/{}: A/B test passed {passed} iterations for {}: switching all traffic to v{t} ({})",
                    d.namespace,
                    d.name,
                    describe_matches(&o.config.matches),
                    verdict.message
                ),
            )),
        };
    }
    if verdict.passed {
        if weight >= 100 {
            return status(
                o,
                t,
                Phase::Promoting,
                100,
                format!(
                    "all traffic on the candidate; handing off to {} after the drain window",
                    d.name
                ),
                false,
                Some(info(
                    reasons::PROMOTING,
                    format!("{}/{}: {}", d.namespace, d.name, verdict.message),
                )),
            );
        }
        return advance(o, &stable, &canary, next).unwrap_or_else(|| wait(None, "advancing"));
    }
    let failed = d.status.failed_checks + 1;
    if failed >= o.config.threshold {
        return fail(o, t, failed, format!("{failed} failed checks: {}", verdict.message));
    }
    let message = format!("Halt advancement: {}", verdict.message);
    Plan {
        action: Action::Status(patch(o, t, Phase::Progressing, weight, failed, message.clone())),
        event: Some(warning(reasons::HALT, format!("{}/{}: {message}", d.namespace, d.name))),
    }
}

fn promoting(o: &Observed<'_>, t: u64) -> Plan {
    if let Some(plan) = before_routing(o, t).or_else(|| stalled(o, t)) {
        return plan;
    }
    let d = &o.deployment;
    let Some(canary) = canary_backend(o, t) else {
        return fail(
            o,
            t,
            o.deployment.status.failed_checks,
            format!("candidate {} disappeared", candidate_name(&d.name, t)),
        );
    };
    if let Some(plan) = ensure_route(o, &[(canary, 100)]) {
        return plan;
    }
    if let Some(until) = routes_settle(o, ms(o.config.drain)) {
        return wait(Some(until), "draining the stable pods before hand-off");
    }
    if held(o, t) {
        return wait(None, "paused on request before hand-off");
    }
    status(
        o,
        t,
        Phase::HandingOff,
        100,
        format!("{} is rolling out v{t} while the candidate carries the traffic", d.name),
        true,
        Some(info(
            reasons::HANDING_OFF,
            format!("{}/{}: handing off to {}", d.namespace, d.name, d.name),
        )),
    )
}

fn handing_off(o: &Observed<'_>, t: u64) -> Plan {
    // Other candidates wait for Finalising: once traffic is on the Deployment's own new pods, nothing
    // (not even a route to the plain host) still needs them.
    let d = &o.deployment;
    if d.paused {
        return status(
            o,
            t,
            Phase::HandingOff,
            100,
            format!("{} is rolling out v{t} while the candidate carries the traffic", d.name),
            true,
            None,
        );
    }
    if !d.rollout_complete || o.new_rs.is_none() {
        return wait(None, &format!("waiting for {} to roll out v{t}", d.name));
    }
    Plan {
        action: Action::Status(StatusPatch {
            intent: Intent::Stable(t),
            ..patch(
                o,
                t,
                Phase::Finalising,
                100,
                0,
                format!("moving traffic to {}'s own pods of v{t}", d.name),
            )
        }),
        event: None,
    }
}

fn finalising(o: &Observed<'_>, t: u64) -> Plan {
    if let Some(new_rs) = &o.new_rs
        && !o.hosts.is_empty()
    {
        let own = Backend {
            name: backends::revision(t),
            hash: new_rs.hash.clone(),
        };
        // Until the candidate is gone the route must stay on the Deployment's pods.
        if let Some(plan) = ensure_route_unless_at_rest(o, &[(own, 100)]) {
            return plan;
        }
    }
    if let Some(plan) = remove_strays(o, None, Some(t)).or_else(|| to_rest(o)) {
        return plan;
    }
    succeeded(o, t)
}

/// `Succeeded` recorded but the intent still there (or a crash between the two): finish the record.
fn succeeded(o: &Observed<'_>, t: u64) -> Plan {
    if let Some(plan) = remove_strays(o, None, Some(t)).or_else(|| to_rest(o)) {
        return plan;
    }
    let d = &o.deployment;
    Plan {
        action: Action::Status(StatusPatch {
            intent: Intent::Clear,
            ..patch(
                o,
                t,
                Phase::Succeeded,
                100,
                d.status.failed_checks,
                format!("v{t} promoted"),
            )
        }),
        event: Some(info(
            reasons::PROMOTED,
            format!("{}/{}: Promotion completed", d.namespace, d.name),
        )),
    }
}

fn failed(o: &Observed<'_>, t: u64) -> Plan {
    remove_strays(o, None, Some(t))
        .or_else(|| to_rest(o))
        .unwrap_or_else(|| {
            wait(
                None,
                &format!(
                    "release v{t} failed; {} stays paused on it: set the template back, change it, or retry",
                    o.deployment.name
                ),
            )
        })
}

/// What comes before any routing step of release `t`: a Deployment resumed behind turnout's back
/// handled, other candidates unwound, and a host turnout cannot route (not its VirtualService, no
/// Istio) failing the release with the reason.
fn before_routing(o: &Observed<'_>, t: u64) -> Option<Plan> {
    bypassed(o, t)
        .or_else(|| unheld_change(o, t).map(|why| fail(o, t, o.deployment.status.failed_checks, why)))
        .or_else(|| rollout_restored(o, t))
        .or_else(|| remove_strays(o, Some(t), Some(t)))
        .or_else(|| unroutable(o).map(|why| fail(o, t, o.deployment.status.failed_checks, why)))
}

/// The safety net for a paused Deployment: its template changed during release `t` without turnout's
/// hold (the webhook down or bypassed: the change kept revision `t`), so the candidate no longer runs
/// what the Deployment holds. Nothing unverified gets traffic: the release is rolled back and the
/// Deployment stays paused on its new template, which `turnout retry` releases (its candidate made
/// from the template as it is then).
fn unheld_change(o: &Observed<'_>, t: u64) -> Option<String> {
    let d = &o.deployment;
    let candidate = o.candidates.iter().find(|c| c.revision == t && !c.deleting)?;
    let made_from = candidate.template_hash.as_deref()?;
    (made_from != d.template_hash).then(|| {
        format!(
            "the pod template of {}/{} changed during the release without turnout's hold (webhook down or \
             bypassed); {} runs the template as it was; `turnout retry` releases the new one",
            d.namespace, d.name, candidate.name
        )
    })
}

/// A failed release (or a retried one) left `Progressing=False, ProgressDeadlineExceeded` in the
/// Deployment's status, which the controller keeps while the Deployment is paused: `kubectl rollout
/// status` would report this release failed. The condition goes back to what a paused Deployment shows.
fn rollout_restored(o: &Observed<'_>, t: u64) -> Option<Plan> {
    let d = &o.deployment;
    if !d.rollout_failed {
        return None;
    }
    let s = &d.status;
    let message = format!("release v{t} in progress");
    Some(Plan {
        action: Action::Status(StatusPatch {
            rollout: Rollout::Restart,
            ..patch(
                o,
                t,
                s.phase.unwrap_or(Phase::Pending),
                s.weight,
                s.failed_checks,
                message,
            )
        }),
        event: None,
    })
}

/// The safety net during a release: the Deployment was resumed before hand-off without turnout (the
/// webhook down or bypassed), so it is replacing the stable pods now. All traffic goes where pods stay —
/// the candidate if it is available, else the plain host — and the release goes on as a hand-off.
fn bypassed(o: &Observed<'_>, t: u64) -> Option<Plan> {
    let d = &o.deployment;
    if d.paused {
        return None;
    }
    let why = format!(
        "{}/{} was resumed before hand-off without turnout (webhook down or bypassed)",
        d.namespace, d.name
    );
    let candidate = canary_backend(o, t).filter(|_| candidate_of(o, t).is_some_and(|c| c.available));
    let moved = match &candidate {
        Some(canary) => ensure_route(o, &[(canary.clone(), 100)]),
        None => route_to_host(o),
    };
    if let Some(mut plan) = moved {
        // A route write, or without a mesh the candidate's size (or its pods put in the Service).
        if moves_traffic(&plan.action) {
            let to = if candidate.is_some() {
                "the candidate"
            } else {
                "every pod"
            };
            plan.event = Some(warning(reasons::BYPASSED, format!("{why}: all traffic to {to}")));
        }
        return Some(plan);
    }
    Some(status(
        o,
        t,
        Phase::HandingOff,
        current_weight(o, &backends::canary(t)),
        format!("{why}; {} is rolling out v{t}", d.name),
        false,
        Some(warning(reasons::BYPASSED, format!("{why}; handing off"))),
    ))
}

/// Routes every managed host to the plain host at once (its pods are the only ones sure to stay).
fn route_to_host(o: &Observed<'_>) -> Option<Plan> {
    o.hosts.iter().enumerate().find_map(|(host, h)| match &h.route {
        Managed::Ours(vs) if vs.value != Route::Host => Some(Plan {
            action: Action::Routing(RoutingAction::PutRoute {
                host,
                route: Route::Host,
            }),
            event: None,
        }),
        _ => None,
    })
}

/// Rolls release `t` back: the status is written first (so `kubectl rollout status` fails at once),
/// the unwinding follows in phase `Failed`.
fn fail(o: &Observed<'_>, t: u64, failed_checks: u32, why: String) -> Plan {
    let d = &o.deployment;
    Plan {
        action: Action::Status(StatusPatch {
            rollout: Rollout::Fail,
            ..patch(
                o,
                t,
                Phase::Failed,
                0,
                failed_checks,
                format!("release v{t} rolled back: {why}"),
            )
        }),
        event: Some(warning(
            reasons::ROLLING_BACK,
            format!(
                "{ns}/{name}: Rolling back: {why}; {name} stays paused on v{t}: `turnout undo {name} -n {ns}` sets it back to stable",
                ns = d.namespace,
                name = d.name
            ),
        )),
    }
}

/// Candidates other than `keep` and the baseline: traffic off (onto the baseline), drained, deleted,
/// gone. `failed` is a release whose candidate can never be the baseline.
fn remove_strays(o: &Observed<'_>, keep: Option<u64>, failed: Option<u64>) -> Option<Plan> {
    let base = baseline(o, failed);
    let strays: Vec<&CandidateView> = o
        .candidates
        .iter()
        .filter(|c| Some(c.revision) != keep && base.as_ref().is_none_or(|(_, from)| *from != Some(c.revision)))
        .collect();
    if strays.is_empty() {
        return None;
    }
    let exposed =
        |route: &Route| *route == Route::Host || strays.iter().any(|c| route.sends_to(&backends::canary(c.revision)));
    let any_exposed = o.hosts.iter().any(|h| match &h.route {
        Managed::Absent => true,
        Managed::Ours(vs) => exposed(&vs.value),
        Managed::Foreign { .. } => false,
    });
    if any_exposed {
        let Some((stable, _)) = base.filter(|(_, from)| from.is_some() || stable_ready(o)) else {
            return Some(wait(
                None,
                "waiting for the stable ReplicaSet to be ready before taking traffic off the candidate",
            ));
        };
        if let Some(plan) = ensure_route(o, &[(stable, 100)]) {
            return Some(plan);
        }
    }
    if let Some(until) = routes_settle(o, ms(o.config.drain)) {
        return Some(wait(Some(until), "draining the candidate before deleting it"));
    }
    let d = &o.deployment;
    if let Some(c) = strays.iter().find(|c| !c.deleting) {
        return Some(Plan {
            action: Action::DeleteCandidate { name: c.name.clone() },
            event: Some(info(
                reasons::CANDIDATE,
                format!("{}/{}: deleting candidate {}", d.namespace, d.name, c.name),
            )),
        });
    }
    Some(wait(None, "waiting for the candidate's pods to terminate"))
}

/// Back to rest once no candidate is left: unused backends removed, route to the host, then no
/// backends (each gone only after no route has named it for the propagation delay and the drain
/// window: a per-version Service may still be in a proxy's configuration until then).
fn to_rest(o: &Observed<'_>) -> Option<Plan> {
    if !o.candidates.is_empty() {
        return None;
    }
    let prop = ms(o.config.propagation_delay);
    let drain = ms(o.config.drain);
    for (host, h) in o.hosts.iter().enumerate() {
        let (Managed::Ours(route), defs) = (&h.route, &h.backends) else {
            continue;
        };
        if route.value == Route::Host {
            continue;
        }
        let Managed::Ours(defs) = defs else {
            // No backends of ours are defined: the route cannot be serving; back to the host.
            if route.propagated(prop) > o.now {
                return Some(wait(Some(route.propagated(prop)), "waiting for the route to propagate"));
            }
            return Some(Plan {
                action: Action::Routing(RoutingAction::PutRoute {
                    host,
                    route: Route::Host,
                }),
                event: None,
            });
        };
        let used: Vec<Backend> = defs
            .value
            .iter()
            .filter(|b| route.value.sends_to(&b.name))
            .cloned()
            .collect();
        // Write the backends once after the last candidate is gone (pruning what no route uses): the
        // route to the host waits for that write to propagate, as the candidate's endpoints do. A
        // backend leaves only once no route has named it for the delay and the drain window.
        if used != defs.value || defs.changed_at < route.changed_at {
            let until = if used.len() < defs.value.len() {
                route.changed_at.saturating_add(prop).saturating_add(drain)
            } else {
                route.propagated(prop)
            };
            if until > o.now {
                return Some(wait(Some(until), "waiting for the route to propagate and drain"));
            }
            return Some(Plan {
                action: Action::Routing(RoutingAction::PutBackends { host, backends: used }),
                event: None,
            });
        }
        // The delay, not a report: it also covers the candidate's endpoints going away.
        if defs.changed_at + prop > o.now {
            return Some(wait(
                Some(defs.changed_at + prop),
                "waiting for the backends to propagate",
            ));
        }
        return Some(Plan {
            action: Action::Routing(RoutingAction::PutRoute {
                host,
                route: Route::Host,
            }),
            event: Some(info(
                reasons::ROUTING,
                format!(
                    "{}/{}: {} routes to every pod again",
                    o.deployment.namespace, o.deployment.name, h.service
                ),
            )),
        });
    }
    for (host, h) in o.hosts.iter().enumerate() {
        let Managed::Ours(defs) = &h.backends else {
            continue;
        };
        if defs.value.is_empty() {
            continue;
        }
        let unnamed_for = match &h.route {
            Managed::Ours(route) => route.changed_at.saturating_add(prop).saturating_add(drain),
            _ => 0,
        };
        if unnamed_for > o.now {
            return Some(wait(Some(unnamed_for), "draining the backends before removing them"));
        }
        return Some(Plan {
            action: Action::Routing(RoutingAction::PutBackends {
                host,
                backends: Vec::new(),
            }),
            event: None,
        });
    }
    None
}

/// Routes `weight` to the canary and the rest to the stable side; below 100, the requests that match
/// the release's matches (if any) to the canary whatever the weight.
fn advance(o: &Observed<'_>, stable: &Backend, canary: &Backend, weight: u8) -> Option<Plan> {
    let weight = weight.min(100);
    let mut want = vec![(canary.clone(), weight)];
    if weight < 100 {
        want.insert(0, (stable.clone(), 100 - weight));
    }
    let matched = (weight < 100 && !o.config.matches.is_empty()).then_some(canary);
    let ab = o.config.strategy == Strategy::AB && weight == 0;
    // Session affinity while the candidate shares the traffic (a canary's steps, an A/B test's
    // users): its answers set the cookie, and whoever carries it stays on it.
    let shares = (weight > 0 && weight < 100) || (ab && matched.is_some());
    let sticky = (shares && o.config.session_affinity.is_some()).then_some(canary);
    // An A/B test with mirroring: copies of a share of the other requests too.
    let mirror = (ab && o.config.mirror.is_some()).then_some(canary);
    let mut plan = ensure_split(o, &want, matched, mirror, sticky)?;
    if moves_traffic(&plan.action) {
        let d = &o.deployment;
        let message = match (o.config.strategy, matched) {
            (Strategy::AB, Some(_)) if weight == 0 => format!(
                "A/B test of {}/{}: requests matching {} to {}, every other one to the stable version{}",
                d.namespace,
                d.name,
                describe_matches(&o.config.matches),
                canary.name,
                o.config
                    .mirror
                    .map(|p| format!(" (and copies of {p} % of them to the candidate)"))
                    .unwrap_or_default()
            ),
            (_, Some(_)) => format!(
                "Advance {}/{} canary weight {weight}, and requests matching {}",
                d.namespace,
                d.name,
                describe_matches(&o.config.matches)
            ),
            (_, None) => format!("Advance {}/{} canary weight {weight}", d.namespace, d.name),
        };
        let message = match (sticky, &o.config.session_affinity) {
            (Some(_), Some(cookie)) => format!("{message} (sticky: whoever reaches it keeps cookie {cookie})"),
            _ => message,
        };
        plan.event = Some(info(reasons::ADVANCE, message));
    }
    Some(plan)
}

/// In `Finalising`: route to the Deployment's own pods, unless the release already reached rest.
fn ensure_route_unless_at_rest(o: &Observed<'_>, want: &[(Backend, u8)]) -> Option<Plan> {
    let at_rest = o.candidates.is_empty()
        && o.hosts.iter().all(|h| match &h.route {
            Managed::Ours(vs) => vs.value == Route::Host || vs.value.weight_of(&want[0].0.name) == 100,
            _ => true,
        });
    if at_rest {
        return None;
    }
    ensure_route(o, want)
}

/// Makes every managed host route `want` (I1: backends first, propagated; one change at a time).
fn ensure_route(o: &Observed<'_>, want: &[(Backend, u8)]) -> Option<Plan> {
    ensure_split(o, want, None, None, None)
}

/// Makes every managed host route `want`, the requests that match the release's matches to
/// `matched`, and copies of the release's mirror share to `mirror` (I1 for both too).
fn ensure_split(
    o: &Observed<'_>,
    want: &[(Backend, u8)],
    matched: Option<&Backend>,
    mirror: Option<&Backend>,
    sticky: Option<&Backend>,
) -> Option<Plan> {
    debug_assert_eq!(want.iter().map(|(_, w)| u32::from(*w)).sum::<u32>(), 100);
    if !weighted(o) {
        return scale_to(o, want);
    }
    let route = Route::Split(Split {
        weights: want
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|(s, w)| Weighted {
                backend: s.name.clone(),
                weight: *w,
            })
            .collect(),
        matched: matched.map(|b| Matched {
            matches: o.config.matches.clone(),
            backend: b.name.clone(),
        }),
        mirror: mirror.map(|b| Mirror {
            backend: b.name.clone(),
            percent: o.config.mirror.unwrap_or(100),
        }),
        sticky: sticky
            .zip(o.config.session_affinity.as_ref())
            .map(|(b, cookie)| Sticky {
                cookie: cookie.clone(),
                backend: b.name.clone(),
            }),
    });
    // The matched and mirror backends must be defined as the weighted ones are.
    let want: Vec<(Backend, u8)> = want
        .iter()
        .cloned()
        .chain(matched.into_iter().chain(mirror).chain(sticky).map(|b| (b.clone(), 1)))
        .collect();
    let want = want.as_slice();
    let prop = ms(o.config.propagation_delay);
    for (host, h) in o.hosts.iter().enumerate() {
        let (current, routed) = match &h.route {
            Managed::Absent => (&Route::Host, 0),
            Managed::Ours(vs) => (&vs.value, vs.propagated(prop)),
            Managed::Foreign { .. } => continue,
        };
        if *current == route {
            continue;
        }
        if routed > o.now {
            return Some(wait(Some(routed), "waiting for the previous route change to propagate"));
        }
        if matches!(h.backends, Managed::Foreign { .. }) {
            continue;
        }
        let named: Vec<Backend> = want.iter().filter(|(_, w)| *w > 0).map(|(s, _)| s.clone()).collect();
        if let Some(plan) = define_on(o, host, &h.backends, &named) {
            return Some(plan);
        }
        return Some(Plan {
            action: Action::Routing(RoutingAction::PutRoute {
                host,
                route: route.clone(),
            }),
            event: None,
        });
    }
    None
}

/// With Gateway API, the route to the stable backend must be accepted by an implementation before
/// any candidate pod exists: the candidate's pods carry the labels the Service selects, so without an
/// implementation serving the route (Gateway API CRDs installed for a gateway that ignores routes
/// attached to Services, say) they would take their share of the Service's traffic at once, at full
/// size. Conformant implementations report `Accepted` in the route's status; one that has not within
/// a bound fails the release, saying why.
fn unaccepted(o: &Observed<'_>, t: u64) -> Option<Plan> {
    if o.provider != ProviderKind::GatewayApi {
        return None;
    }
    let (service, changed_at) = o.hosts.iter().find_map(|h| match &h.route {
        Managed::Ours(r) if r.synced != Synced::Reported => Some((&h.service, r.changed_at)),
        _ => None,
    })?;
    let bound = (ms(o.config.propagation_delay) * 6).max(30_000);
    let d = &o.deployment;
    if o.now < changed_at + bound {
        return Some(wait(
            Some(changed_at + bound),
            &format!(
                "waiting for a Gateway API implementation to accept HTTPRoute {}/{service}",
                d.namespace
            ),
        ));
    }
    Some(fail(
        o,
        t,
        d.status.failed_checks,
        format!(
            "no Gateway API implementation accepted HTTPRoute {}/{service} within {}s: without one the \
             candidate's pods would take traffic straight from Service {service}. Install a mesh or gateway \
             that implements HTTPRoute for this parent, or set turnout.dev/provider",
            d.namespace,
            bound / 1000
        ),
    ))
}

/// Why this release cannot route: a routing object that is not turnout's, or the provider not
/// installed.
fn unroutable(o: &Observed<'_>) -> Option<String> {
    if let Some(why) = &o.routing_unavailable
        && !o.hosts.is_empty()
    {
        return Some(why.clone());
    }
    if o.config.mirror.is_some() && !o.provider.caps().mirror && !o.hosts.is_empty() {
        return Some(format!(
            "the {} provider cannot copy requests (turnout.dev/mirror): use istio or gateway-api, or remove it",
            o.provider
        ));
    }
    if o.config.session_affinity.is_some() && !o.provider.caps().matches && !o.hosts.is_empty() {
        return Some(format!(
            "the {} provider cannot keep a user on one version (turnout.dev/session-affinity): use istio or \
             gateway-api, or remove it",
            o.provider
        ));
    }
    if !o.config.matches.is_empty() && !o.provider.caps().matches && !o.hosts.is_empty() {
        return Some(format!(
            "the {} provider cannot send requests by header or query parameter ({} {}): use istio or \
             gateway-api, or remove turnout.dev/match",
            o.provider,
            o.config.strategy.as_str(),
            describe_matches(&o.config.matches)
        ));
    }
    o.hosts.iter().find_map(|h: &HostRouting| {
        let ((Managed::Foreign { kind, name }, _) | (_, Managed::Foreign { kind, name })) = (&h.route, &h.backends)
        else {
            return None;
        };
        Some(format!(
            "{kind} {name} for Service {} is not managed by turnout; it was left untouched (label it \
             app.kubernetes.io/managed-by=turnout or delete it to let turnout manage the host)",
            h.service
        ))
    })
}

fn stable_revision(o: &Observed<'_>) -> u64 {
    o.deployment.stable_revision.unwrap_or(o.deployment.template_revision)
}

/// The backend of the stable ReplicaSet, when it has pods.
fn stable_backend(o: &Observed<'_>) -> Option<Backend> {
    let rs = o.stable_rs.as_ref().filter(|rs| rs.ready > 0)?;
    if o.hosts.is_empty() {
        return None;
    }
    Some(Backend {
        name: backends::revision(stable_revision(o)),
        hash: rs.hash.clone(),
    })
}

/// The backend a release moves traffic from and an abort moves it back to, and the candidate revision
/// it belongs to if it is one. Normally the stable ReplicaSet; when that one no longer has its pods (a
/// release superseded during hand-off, after the Deployment replaced some of them), the previous
/// candidate, which carried the traffic then and is kept until the new release no longer needs a way
/// back. The candidate of release `not` never qualifies.
fn baseline(o: &Observed<'_>, not: Option<u64>) -> Option<(Backend, Option<u64>)> {
    if stable_ready(o)
        && let Some(s) = stable_backend(o)
    {
        return Some((s, None));
    }
    let carrying = o
        .candidates
        .iter()
        .filter(|c| Some(c.revision) != not && c.available && !c.deleting)
        .filter_map(|c| {
            let weight = current_weight(o, &backends::canary(c.revision));
            Some((weight, c.revision, c.hash.clone()?))
        })
        .max_by_key(|(weight, revision, _)| (*weight, *revision));
    if let Some((_, revision, hash)) = carrying {
        return Some((
            Backend {
                name: backends::canary(revision),
                hash,
            },
            Some(revision),
        ));
    }
    stable_backend(o).map(|s| (s, None))
}

/// The stable ReplicaSet can take all the traffic back.
fn stable_ready(o: &Observed<'_>) -> bool {
    o.stable_rs
        .as_ref()
        .is_some_and(|rs| rs.ready >= o.deployment.replicas.max(1))
}

fn candidate_of<'o>(o: &'o Observed<'_>, t: u64) -> Option<&'o CandidateView> {
    o.candidates.iter().find(|c| c.revision == t && !c.deleting)
}

fn canary_backend(o: &Observed<'_>, t: u64) -> Option<Backend> {
    let c = candidate_of(o, t)?;
    Some(Backend {
        name: backends::canary(t),
        hash: c.hash.clone()?,
    })
}

/// The canary's weight on the first managed host (all hosts move together); without a mesh, the
/// weight its candidate was scaled for.
fn current_weight(o: &Observed<'_>, canary: &str) -> u8 {
    if !weighted(o) {
        return o
            .candidates
            .iter()
            .filter(|c| !c.deleting && backends::canary(c.revision) == canary)
            .map(scaled_weight)
            .max()
            .unwrap_or(0);
    }
    o.hosts
        .iter()
        .find_map(|h| match &h.route {
            Managed::Ours(vs) => Some(vs.value.weight_of(canary)),
            _ => None,
        })
        .unwrap_or(0)
}

fn last_route_change(o: &Observed<'_>) -> Millis {
    if !weighted(o) {
        // A candidate's size changes who gets traffic as its pods become ready: their endpoints
        // spread from then.
        return o
            .candidates
            .iter()
            .filter_map(|c| c.scale.map(|s| s.at.max(c.ready_at)))
            .max()
            .unwrap_or(0);
    }
    o.hosts
        .iter()
        .filter_map(|h| match &h.route {
            Managed::Ours(vs) => Some(vs.changed_at),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// When every route change has reached every proxy (reported by Istio or bounded by the delay).
fn last_propagation(o: &Observed<'_>) -> Millis {
    let prop = ms(o.config.propagation_delay);
    if !weighted(o) {
        // Endpoints of new pods reach every node within the delay; nothing reports it.
        return last_route_change(o) + prop;
    }
    o.hosts
        .iter()
        .filter_map(|h| match &h.route {
            Managed::Ours(vs) => Some(vs.propagated(prop)),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// When the last route change will have propagated and `extra` (a drain window) more passed, if that
/// is still ahead. A drain counts from the delay's bound even when Istio reports the change pushed
/// sooner: when exactly the last proxy stopped sending is not reported.
fn routes_settle(o: &Observed<'_>, extra: Millis) -> Option<Millis> {
    let until = if extra == 0 {
        last_propagation(o)
    } else {
        last_route_change(o) + ms(o.config.propagation_delay) + extra
    };
    (o.now < until).then_some(until)
}

/// The routing is written by a provider (a mesh or gateway), else the share is set by replica counts.
fn weighted(o: &Observed<'_>) -> bool {
    o.provider.caps().weights
}

/// A write that changes who gets traffic: a route, or (without a mesh) a candidate's size.
fn moves_traffic(action: &Action) -> bool {
    matches!(
        action,
        Action::Routing(RoutingAction::PutRoute { .. }) | Action::ScaleCandidate { .. }
    )
}

/// The weight a candidate's size stands for (one made at full size, by a mesh provider: 100).
fn scaled_weight(c: &CandidateView) -> u8 {
    c.scale.map_or(100, |s| s.weight)
}

/// Without a mesh, the route is the candidates' sizes: each named in `want` gets its weight's share of
/// the pods, one change at a time; a step up waits for the previous one's pods and endpoints, a step
/// down (an abort) does not. A held candidate (every one turnout makes without a mesh) not named
/// leaves the Service first (weight 0, its size kept: its pods keep running through the drain before
/// [`remove_strays`] deletes it); one made before candidates were held is left as it is, its pods
/// serving until deleted. A candidate on the stable side of a step (the first of two: a previous
/// candidate as the baseline) keeps its full size, as the stable ReplicaSet does (I5).
fn scale_to(o: &Observed<'_>, want: &[(Backend, u8)]) -> Option<Plan> {
    let stable = o.deployment.replicas;
    let in_route: Vec<u64> = o
        .candidates
        .iter()
        .filter(|c| want.iter().any(|(b, _)| b.name == backends::canary(c.revision)))
        .map(|c| c.revision)
        .collect();
    let changes: Vec<(&CandidateView, u8)> = o
        .candidates
        .iter()
        .filter(|c| !c.deleting)
        .filter_map(|c| {
            let name = backends::canary(c.revision);
            let target = match want.iter().position(|(b, _)| b.name == name) {
                None if c.held => 0,
                None => return None,
                Some(0) if want.len() == 2 => 100,
                Some(i) => want[i].1,
            };
            (scaled_weight(c) != target).then_some((c, target))
        })
        .collect();
    // Pods join before others leave: a held candidate left out of `want` leaves the Service only once
    // the candidates that take its requests serve, and that has propagated.
    let (c, target) = changes
        .iter()
        .find(|(c, target)| *target > scaled_weight(c))
        .or_else(|| changes.iter().find(|(c, _)| c.held))
        .or_else(|| changes.first())?;
    let (c, target) = (*c, *target);
    let current = scaled_weight(c);
    if (target > current || c.held)
        && let Some(until) = step_settles(o, &in_route)
    {
        return Some(wait(Some(until), "waiting for the previous step's pods to be ready"));
    }
    Some(Plan {
        action: Action::ScaleCandidate {
            name: c.name.clone(),
            replicas: if target == 0 && c.held {
                c.replicas
            } else {
                candidate_replicas(stable, target)
            },
            weight: target,
        },
        event: None,
    })
}

/// When the last step has taken effect: its route change propagated, and without a mesh the pods of
/// the candidates of the route (revisions `in_route`) scaled up ready.
fn step_settles(o: &Observed<'_>, in_route: &[u64]) -> Option<Millis> {
    pods_starting(o, in_route).or_else(|| routes_settle(o, 0))
}

/// Without a mesh: a candidate of the route (revisions `in_route`) scaled up whose pods are not all
/// ready yet (they take their share of the traffic as they become ready), and until when that may
/// take. Other candidates (a stray that crash-loops, say) hold nothing up: they are deleted, never
/// scaled.
fn pods_starting(o: &Observed<'_>, in_route: &[u64]) -> Option<Millis> {
    if weighted(o) {
        return None;
    }
    let deadline = ms(o.config.progress_deadline);
    o.candidates
        .iter()
        .filter(|c| in_route.contains(&c.revision) && !c.deleting && !c.available)
        .filter_map(|c| c.scale)
        .filter(|s| s.weight > 0)
        .map(|s| (s.at + deadline).max(o.now + 1_000))
        .min()
}

/// Without a mesh: the candidate of release `t` was scaled and its pods did not all become ready
/// within the progress deadline.
fn stalled(o: &Observed<'_>, t: u64) -> Option<Plan> {
    let c = candidate_of(o, t).filter(|c| !weighted(o) && !c.available)?;
    let at = c.scale?.at;
    (o.now >= at + ms(o.config.progress_deadline)).then(|| {
        fail(
            o,
            t,
            o.deployment.status.failed_checks,
            format!(
                "candidate {} not available within {} of being scaled",
                c.name,
                humantime::format_duration(o.config.progress_deadline)
            ),
        )
    })
}

fn status(
    o: &Observed<'_>,
    t: u64,
    phase: Phase,
    weight: u8,
    message: String,
    unpause: bool,
    event: Option<Event>,
) -> Plan {
    let d = &o.deployment;
    // Failed checks count per step.
    let same_step = phase == d.status.phase.unwrap_or(Phase::Pending) && weight == d.status.weight;
    let failed_checks = if same_step { d.status.failed_checks } else { 0 };
    Plan {
        action: Action::Status(StatusPatch {
            unpause,
            ..patch(o, t, phase, weight, failed_checks, message)
        }),
        event,
    }
}

/// A status write for release `t` that changes nothing else; a pause on request is kept while the
/// release can still be paused.
fn patch(o: &Observed<'_>, t: u64, phase: Phase, weight: u8, failed_checks: u32, message: String) -> StatusPatch {
    let d = &o.deployment;
    StatusPatch {
        phase,
        release: t,
        weight,
        failed_checks,
        // An A/B test's passed analyses count until the release starts (again: a retry).
        iteration: if d.status.release == Some(t) && phase != Phase::Pending {
            d.status.iteration
        } else {
            0
        },
        message,
        unpause: false,
        intent: Intent::Keep,
        rollout: Rollout::Keep,
        paused: d.status.paused && d.status.release == Some(t) && phase.before_hand_off(),
        clear_request: false,
        provider: o.provider,
        strategy: o.config.strategy,
    }
}

/// The status of release `t` at canary `weight`.
fn at_weight(o: &Observed<'_>, t: u64, weight: u8) -> Plan {
    if switched(o, t, weight) {
        // The iterations from here count the analyses of the rollback window.
        let message = format!(
            "{}; v{} stays at full size for a rollback",
            switched_to(o, t),
            stable_revision(o)
        );
        return Plan {
            action: Action::Status(StatusPatch {
                iteration: 0,
                ..patch(o, t, Phase::Progressing, weight, 0, message)
            }),
            event: None,
        };
    }
    status(
        o,
        t,
        Phase::Progressing,
        weight,
        format!("canary weight {weight}"),
        false,
        None,
    )
}

fn wait(until: Option<Millis>, reason: &str) -> Plan {
    Plan {
        action: Action::Wait {
            until,
            reason: reason.to_owned(),
        },
        event: None,
    }
}

fn info(reason: &'static str, message: String) -> Event {
    Event {
        warning: false,
        reason,
        message,
    }
}

fn warning(reason: &'static str, message: String) -> Event {
    Event {
        warning: true,
        reason,
        message,
    }
}

fn ms(d: std::time::Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
