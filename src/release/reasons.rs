//! The reasons of the Events turnout records on a Deployment, one constant each. The README lists
//! [`ALL`] with what each means (checked by `tests/docs.rs`); notifications choose their message by
//! them.

/// A release began (the first template change held since the last release).
pub const STARTED: &str = "Started";
/// A newer template replaced the release in flight, which is unwound as the new one starts.
pub const SUPERSEDED: &str = "Superseded";
/// The candidate Deployment was created.
pub const CANDIDATE: &str = "Candidate";
/// A host is routed through the provider at rest (a route attached to a Gateway).
pub const ROUTING: &str = "Routing";
/// Traffic moved to the next canary step (and the requests that match, and sticky users).
pub const ADVANCE: &str = "Advance";
/// Copies of a share of the requests go to the candidate, or an analysis of them passed.
pub const MIRROR: &str = "Mirror";
/// A blue/green candidate stands by at full size.
pub const BLUE_GREEN: &str = "BlueGreen";
/// An analysis of an A/B test or a blue/green standby passed.
pub const ITERATION: &str = "Iteration";
/// Blue/green: all traffic moved to the candidate in one step.
pub const SWITCHED: &str = "Switched";
/// An analysis failed: the release holds where it is (warning).
pub const HALT: &str = "Halt";
/// All traffic is on the candidate (or a promotion was requested); the hand-off follows.
pub const PROMOTING: &str = "Promoting";
/// The Deployment's own rollout runs while the candidate carries the traffic.
pub const HANDING_OFF: &str = "HandingOff";
/// The release ended: the Deployment runs it, the candidate is gone.
pub const PROMOTED: &str = "Promoted";
/// The release failed (checks, deadline, abort, a route in the way): traffic back to the stable version (warning).
pub const ROLLING_BACK: &str = "RollingBack";
/// The template was set back to the stable one: the release was unwound.
pub const ROLLED_BACK: &str = "RolledBack";
/// The Deployment opted out during a release: unwound and handed back to its own controller (warning).
pub const HANDED_BACK: &str = "HandedBack";
/// The Deployment was resumed behind turnout's back: traffic kept safe, then handed off (warning).
pub const BYPASSED: &str = "Bypassed";
/// The release was paused on request.
pub const PAUSED: &str = "Paused";
/// The release was resumed on request.
pub const RESUMED: &str = "Resumed";
/// A failed release was retried on request.
pub const RETRYING: &str = "Retrying";
/// A request (promote, abort, …) could not be acted on, with why (warning).
pub const REQUEST_REFUSED: &str = "RequestRefused";
/// An annotation's value is invalid: the level below's is used (warning).
pub const INVALID_CONFIGURATION: &str = "InvalidConfiguration";
/// A Deployment rolled out without the webhook holding it (warning).
pub const UNHELD_ROLLOUT: &str = "UnheldRollout";
/// An event hook could not be delivered (warning).
pub const HOOK_FAILED: &str = "HookFailed";
/// A chat notification could not be delivered (warning).
pub const NOTIFICATION_FAILED: &str = "NotificationFailed";

/// Every reason, in the order of a release.
pub const ALL: [&str; 25] = [
    STARTED,
    SUPERSEDED,
    CANDIDATE,
    ROUTING,
    ADVANCE,
    MIRROR,
    BLUE_GREEN,
    ITERATION,
    SWITCHED,
    HALT,
    PROMOTING,
    HANDING_OFF,
    PROMOTED,
    ROLLING_BACK,
    ROLLED_BACK,
    HANDED_BACK,
    BYPASSED,
    PAUSED,
    RESUMED,
    RETRYING,
    REQUEST_REFUSED,
    INVALID_CONFIGURATION,
    UNHELD_ROLLOUT,
    HOOK_FAILED,
    NOTIFICATION_FAILED,
];
