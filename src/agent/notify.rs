//! Notifications to a team's chat: Slack, Microsoft Teams, Discord and a generic JSON webhook, each in
//! that service's own message format, for a release started, halted (with the failed checks),
//! promoted, rolled back, and for the safety net's unheld rollout.
//!
//! Configured by `turnout.dev/notify: <Secret name>` on the namespace or the Deployment; the Secret,
//! in the Deployment's namespace, holds the URLs under the keys `slack`, `teams`, `discord` and
//! `webhook` (a chat webhook URL is a credential: it never sits in an annotation).
//! `turnout.dev/notify-severity: warning` leaves out the good news (started, promoted).
//!
//! Delivery runs in the background with bounded retries and never holds a release; a delivery that
//! fails is a Warning Event `NotificationFailed` and a metric.

use serde_json::{Value, json};

use crate::release::{DeploymentView, Event, reasons};

/// A chat service, by its key in the Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Slack,
    Teams,
    Discord,
    Webhook,
}

impl Service {
    pub const ALL: [Service; 4] = [Service::Slack, Service::Teams, Service::Discord, Service::Webhook];

    /// Its key in the Secret, and its metric label.
    pub fn key(self) -> &'static str {
        match self {
            Service::Slack => "slack",
            Service::Teams => "teams",
            Service::Discord => "discord",
            Service::Webhook => "webhook",
        }
    }
}

/// How much a notice matters; `turnout.dev/notify-severity` is the least that is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// A release started or was promoted.
    #[default]
    Info,
    /// A release halted, rolled back, or an update rolled out without turnout.
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        [Severity::Info, Severity::Warning]
            .into_iter()
            .find(|v| v.as_str() == s.trim())
    }
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Started,
    Halted,
    Promoted,
    RolledBack,
    Unheld,
}

impl Kind {
    /// The notice an Event stands for, by its reason; most Events are not notified.
    pub fn of(event: &Event) -> Option<Kind> {
        Some(match event.reason {
            reasons::STARTED | reasons::SUPERSEDED => Kind::Started,
            reasons::HALT => Kind::Halted,
            reasons::PROMOTED => Kind::Promoted,
            reasons::ROLLING_BACK => Kind::RolledBack,
            reasons::UNHELD_ROLLOUT => Kind::Unheld,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Started => "started",
            Kind::Halted => "halted",
            Kind::Promoted => "promoted",
            Kind::RolledBack => "rolled-back",
            Kind::Unheld => "unheld-rollout",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Kind::Started | Kind::Promoted => Severity::Info,
            Kind::Halted | Kind::RolledBack | Kind::Unheld => Severity::Warning,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Kind::Started => "Release started",
            Kind::Halted => "Release halted",
            Kind::Promoted => "Release promoted",
            Kind::RolledBack => "Release rolled back",
            Kind::Unheld => "Update rolled out without turnout",
        }
    }

    /// Colour of the message: green, amber or red.
    fn colour(self) -> u32 {
        match self {
            Kind::Started | Kind::Promoted => 0x2e_b8_86,
            Kind::Halted => 0xf2_c7_44,
            Kind::RolledBack | Kind::Unheld => 0xd6_40_40,
        }
    }
}

/// One notification, whatever the service.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    pub kind: Kind,
    pub namespace: String,
    pub deployment: String,
    pub release: u64,
    pub phase: String,
    pub weight: u8,
    /// The Event's message: what happened, with the failed checks for a halt or a rollback.
    pub message: String,
}

impl Notice {
    /// The notice of `event` about the release of `view`, if the Event is one that is notified.
    pub fn of(event: &Event, view: &DeploymentView) -> Option<Notice> {
        Some(Notice {
            kind: Kind::of(event)?,
            namespace: view.namespace.clone(),
            deployment: view.name.clone(),
            release: view.status.release.unwrap_or(view.template_revision),
            phase: view.status.phase.map_or("-", |p| p.as_str()).to_owned(),
            weight: view.status.weight,
            message: event.message.clone(),
        })
    }

    fn headline(&self) -> String {
        format!(
            "{}: {}/{} v{}",
            self.kind.title(),
            self.namespace,
            self.deployment,
            self.release
        )
    }

    fn facts(&self) -> [(&'static str, String); 4] {
        [
            ("Deployment", format!("{}/{}", self.namespace, self.deployment)),
            ("Release", format!("v{}", self.release)),
            ("Phase", self.phase.clone()),
            ("Canary weight", format!("{} %", self.weight)),
        ]
    }

    /// The body `service` takes: Slack's Block Kit, a Teams Adaptive Card, a Discord embed, or
    /// turnout's own JSON for the generic webhook.
    pub fn payload(&self, service: Service) -> Value {
        let headline = self.headline();
        match service {
            // Slack's limits: a header's text 150 characters, a section's 3,000, a field's 2,000; its
            // mrkdwn reads `&`, `<` and `>` as markup, so they are escaped.
            Service::Slack => json!({
                "text": clip(&format!("{headline}: {}", self.message), 3000),
                "blocks": [
                    { "type": "header", "text": { "type": "plain_text", "text": clip(&headline, 150) } },
                    { "type": "section", "text": { "type": "mrkdwn", "text": clip(&slack_escape(&self.message), 3000) } },
                    { "type": "section", "fields": self.facts().iter()
                        .map(|(k, v)| json!({ "type": "mrkdwn", "text": clip(&format!("*{k}*\n{}", slack_escape(v)), 2000) }))
                        .collect::<Vec<_>>() },
                ],
            }),
            Service::Teams => json!({
                "type": "message",
                "attachments": [{
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": null,
                    "content": {
                        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                        "type": "AdaptiveCard",
                        "version": "1.4",
                        "body": [
                            { "type": "TextBlock", "size": "Medium", "weight": "Bolder", "text": headline,
                              "color": if self.kind.severity() == Severity::Warning { "Attention" } else { "Good" } },
                            { "type": "TextBlock", "text": self.message, "wrap": true },
                            { "type": "FactSet", "facts": self.facts().iter()
                                .map(|(k, v)| json!({ "title": k, "value": v }))
                                .collect::<Vec<_>>() },
                        ],
                    },
                }],
            }),
            // Discord's limits: a title 256 characters, a description 4,096, a field's value 1,024.
            Service::Discord => json!({
                "username": "turnout",
                "embeds": [{
                    "title": clip(&headline, 256),
                    "description": clip(&self.message, 4096),
                    "color": self.kind.colour(),
                    "fields": self.facts().iter()
                        .map(|(k, v)| json!({ "name": k, "value": clip(v, 1024), "inline": true }))
                        .collect::<Vec<_>>(),
                }],
            }),
            Service::Webhook => json!({
                "kind": self.kind.as_str(),
                "severity": self.kind.severity().as_str(),
                "namespace": self.namespace,
                "deployment": self.deployment,
                "release": self.release,
                "phase": self.phase,
                "weight": self.weight,
                "message": self.message,
            }),
        }
    }
}

/// `text` cut to at most `max` characters, an ellipsis marking the cut.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `text` with the characters Slack's mrkdwn reads as markup escaped (`&`, `<`, `>`).
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::{Phase, StatusView};

    #[test]
    fn long_messages_are_cut_to_each_service_s_limits_and_slack_markup_is_escaped() {
        let mut notice = rolled_back();
        notice.message = format!("<!channel> a & b {}", "x".repeat(5000));
        let slack = notice.payload(Service::Slack);
        let section = slack["blocks"][1]["text"]["text"].as_str().unwrap();
        assert!(section.starts_with("&lt;!channel&gt; a &amp; b"), "{section}");
        assert_eq!(section.chars().count(), 3000);
        assert!(section.ends_with('…'));
        let discord = notice.payload(Service::Discord);
        assert_eq!(
            discord["embeds"][0]["description"].as_str().unwrap().chars().count(),
            4096
        );
        // Untouched where nothing is over a limit.
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("ééé", 2), "é…");
    }

    fn view() -> DeploymentView {
        DeploymentView {
            namespace: "shop".into(),
            name: "podinfo".into(),
            template_revision: 3,
            status: StatusView {
                phase: Some(Phase::Failed),
                release: Some(3),
                weight: 20,
                ..StatusView::default()
            },
            ..DeploymentView::default()
        }
    }

    fn rolled_back() -> Notice {
        let event = Event {
            warning: true,
            reason: "RollingBack",
            message: "shop/podinfo: Rolling back: 2 failed checks: success rate 53.4% < 99%".into(),
        };
        Notice::of(&event, &view()).unwrap()
    }

    #[test]
    fn events_that_are_notified_and_their_severity() {
        let e = |reason: &'static str| Event {
            warning: false,
            reason,
            message: String::new(),
        };
        let kinds: Vec<Option<Kind>> = [
            "Started",
            "Superseded",
            "Halt",
            "Promoted",
            "RollingBack",
            "UnheldRollout",
            "Advance",
        ]
        .into_iter()
        .map(|r| Kind::of(&e(r)))
        .collect();
        assert_eq!(
            kinds,
            [
                Some(Kind::Started),
                Some(Kind::Started),
                Some(Kind::Halted),
                Some(Kind::Promoted),
                Some(Kind::RolledBack),
                Some(Kind::Unheld),
                None
            ]
        );
        assert!(Kind::RolledBack.severity() > Kind::Promoted.severity());
        assert_eq!(Severity::parse(" warning"), Some(Severity::Warning));
        assert_eq!(Severity::parse("loud"), None);
    }

    #[test]
    fn each_service_gets_its_own_format() {
        let n = rolled_back();
        let slack = n.payload(Service::Slack);
        assert_eq!(slack["blocks"][0]["type"], "header");
        assert_eq!(
            slack["blocks"][0]["text"]["text"],
            "Release rolled back: shop/podinfo v3"
        );
        assert!(slack["text"].as_str().unwrap().contains("success rate 53.4% < 99%"));
        assert_eq!(slack["blocks"][2]["fields"][3]["text"], "*Canary weight*\n20 %");

        let teams = n.payload(Service::Teams);
        let card = &teams["attachments"][0];
        assert_eq!(card["contentType"], "application/vnd.microsoft.card.adaptive");
        assert_eq!(card["content"]["type"], "AdaptiveCard");
        assert_eq!(card["content"]["body"][0]["color"], "Attention");
        assert_eq!(
            card["content"]["body"][2]["facts"][2],
            json!({"title": "Phase", "value": "Failed"})
        );

        let discord = n.payload(Service::Discord);
        assert_eq!(discord["embeds"][0]["title"], "Release rolled back: shop/podinfo v3");
        assert_eq!(discord["embeds"][0]["color"], 0xd6_40_40);
        assert_eq!(discord["embeds"][0]["fields"][1]["value"], "v3");

        let hook = n.payload(Service::Webhook);
        assert_eq!(
            hook,
            json!({ "kind": "rolled-back", "severity": "warning", "namespace": "shop", "deployment": "podinfo",
                    "release": 3, "phase": "Failed", "weight": 20,
                    "message": "shop/podinfo: Rolling back: 2 failed checks: success rate 53.4% < 99%" })
        );
    }
}
