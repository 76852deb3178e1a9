//! The Istio provider: a DestinationRule per host whose subsets select ReplicaSets by
//! `pod-template-hash` (the backends), and a VirtualService per host (the route): an HTTP route
//! `turnout-match` first when requests that match go to one backend (its `match` list is the
//! release's, as `HTTPMatchRequest`s), then the route `turnout` with the weights. Propagation is read
//! from istiod's `Reconciled` condition when its status feature is on.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, Resource, ResourceExt};

use super::{Written, changed_at, managed, managed_meta};
use crate::agent::cache::Kind;
use crate::istio::destination_rule::{DestinationRule, DestinationRuleSpec, DestinationRuleSubsets};
use crate::istio::virtual_service::{
    VirtualService, VirtualServiceHttp, VirtualServiceHttpMatch, VirtualServiceHttpMatchHeaders,
    VirtualServiceHttpMatchQueryParams, VirtualServiceHttpMirror, VirtualServiceHttpMirrorPercentage,
    VirtualServiceHttpRoute, VirtualServiceHttpRouteDestination, VirtualServiceHttpRouteHeaders,
    VirtualServiceHttpRouteHeadersResponse, VirtualServiceSpec,
};
use crate::names::agent;
use crate::release::routing::{MatchKind, Matched, Mirror, RequestMatch, Split, Sticky, ValueMatch};
use crate::release::{Applied, Backend, HostRouting, Millis, Route, RoutingAction, Synced, Weighted};

/// The name of the HTTP route that sends the requests that match to one backend.
const MATCH_ROUTE: &str = "turnout-match";

/// The name of the HTTP route that keeps the requests carrying the affinity cookie on its backend.
const STICKY_ROUTE: &str = "turnout-sticky";

/// The response header by which a backend's answers set the affinity cookie.
const SET_COOKIE: &str = "set-cookie";

/// What is stored for a host, for replace.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    pub virtual_service: Option<VirtualService>,
    pub destination_rule: Option<DestinationRule>,
}

/// The routing of Service `service` from its VirtualService and DestinationRule (named after it).
pub fn observe(service: &str, stored: &Stored) -> HostRouting {
    HostRouting {
        service: service.to_owned(),
        route: managed("VirtualService", stored.virtual_service.as_ref(), route_of),
        backends: managed("DestinationRule", stored.destination_rule.as_ref(), backends_of),
        route_at_rest: false,
    }
}

/// Carries out `action` on the host's VirtualService or DestinationRule.
pub async fn apply(
    client: &Client,
    d: &Deployment,
    host: &HostRouting,
    stored: &Stored,
    action: &RoutingAction,
    now: Millis,
) -> kube::Result<Vec<Written>> {
    let ns = d.namespace().unwrap_or_default();
    let service = &host.service;
    match action {
        RoutingAction::PutBackends { backends, .. } => {
            let api: Api<DestinationRule> = Api::namespaced(client.clone(), &ns);
            let before = stored.destination_rule.as_ref().map(|o| &o.metadata);
            let mut dr = DestinationRule::new(service, destination_rule_spec(service, &ns, backends));
            dr.metadata = managed_meta(d, service, before, now);
            write(&api, service, dr, before.is_some()).await?;
            Ok(vec![Written::of(Kind::DestinationRule, &ns, service, before)])
        }
        RoutingAction::PutRoute { route, .. } => {
            let api: Api<VirtualService> = Api::namespaced(client.clone(), &ns);
            let before = stored.virtual_service.as_ref().map(|o| &o.metadata);
            let mut vs = VirtualService::new(service, virtual_service_spec(service, &ns, route));
            vs.metadata = managed_meta(d, service, before, now);
            write(&api, service, vs, before.is_some()).await?;
            Ok(vec![Written::of(Kind::VirtualService, &ns, service, before)])
        }
    }
}

async fn write<K>(api: &Api<K>, name: &str, obj: K, exists: bool) -> kube::Result<()>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if exists {
        api.replace(name, &PostParams::default(), &obj).await?;
    } else {
        api.create(&PostParams::default(), &obj).await?;
    }
    Ok(())
}

/// Whether istiod reports this generation pushed to every proxy: condition `Reconciled=True` and the
/// status's `observedGeneration` equal to the object's generation. (istiod writes it only with its
/// status feature enabled; otherwise turnout relies on the propagation delay.)
fn reconciled(
    meta: &ObjectMeta,
    conditions: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
    observed: Option<&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
) -> Synced {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let observed = match observed {
        Some(IntOrString::Int(n)) => Some(i64::from(*n)),
        Some(IntOrString::String(s)) => s.parse().ok(),
        None => None,
    };
    let reported = observed.is_some()
        && observed == meta.generation
        && conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == "Reconciled" && c.status == "True"));
    if reported { Synced::Reported } else { Synced::Unknown }
}

/// A managed VirtualService: the route `turnout-match` if there is one, then the last HTTP route's
/// weights.
fn route_of(vs: &VirtualService) -> Applied<Route> {
    let http = vs.spec.http.as_deref().unwrap_or_default();
    let subset_of = |h: &VirtualServiceHttp| {
        h.route
            .as_ref()
            .and_then(|r| r.first())
            .and_then(|d| d.destination.subset.clone())
    };
    let matched = http
        .iter()
        .find(|h| h.name.as_deref() == Some(MATCH_ROUTE))
        .and_then(|h| {
            Some(Matched {
                matches: h.r#match.iter().flatten().map(request_match_of).collect(),
                backend: subset_of(h)?,
            })
        });
    let ours = |h: &&VirtualServiceHttp| matches!(h.name.as_deref(), Some(MATCH_ROUTE | STICKY_ROUTE));
    let weighted = http.iter().rfind(|h| !ours(h));
    // The sticky route's backend, and the cookie its answers set on the weighted route (or, in an A/B
    // test, on the route of the requests that match).
    let sticky = http
        .iter()
        .find(|h| h.name.as_deref() == Some(STICKY_ROUTE))
        .and_then(subset_of)
        .and_then(|backend| {
            let dest = weighted
                .into_iter()
                .chain(http.iter().find(|h| h.name.as_deref() == Some(MATCH_ROUTE)))
                .flat_map(|h| h.route.iter().flatten())
                .find(|d| {
                    d.destination.subset.as_deref() == Some(backend.as_str())
                        && d.headers.as_ref().is_some_and(|h| h.response.is_some())
                })?;
            let set = dest
                .headers
                .as_ref()?
                .response
                .as_ref()?
                .add
                .as_ref()?
                .get(SET_COOKIE)?;
            Sticky::from_set_cookie(set).filter(|s| s.backend == backend)
        });
    let mirror = weighted.and_then(|h| {
        Some(Mirror {
            backend: h.mirror.as_ref()?.subset.clone()?,
            percent: h.mirror_percentage.as_ref().and_then(|p| p.value).map_or(100, percent),
        })
    });
    let route = weighted.and_then(|h| h.route.as_ref()).map_or(Route::Host, |dests| {
        if dests.iter().all(|d| d.destination.subset.is_none())
            && matched.is_none()
            && mirror.is_none()
            && sticky.is_none()
        {
            Route::Host
        } else {
            Route::Split(Split {
                weights: dests
                    .iter()
                    .map(|d| Weighted {
                        backend: d.destination.subset.clone().unwrap_or_default(),
                        weight: u8::try_from(d.weight.unwrap_or(0).clamp(0, 100)).unwrap_or(0),
                    })
                    .collect(),
                matched,
                mirror,
                sticky,
            })
        }
    });
    let status = vs.status.as_ref();
    Applied {
        value: route,
        changed_at: changed_at(&vs.metadata),
        synced: reconciled(
            &vs.metadata,
            status.and_then(|s| s.conditions.as_deref()),
            status.and_then(|s| s.observed_generation.as_ref()),
        ),
    }
}

fn backends_of(dr: &DestinationRule) -> Applied<Vec<Backend>> {
    let backends = dr
        .spec
        .subsets
        .iter()
        .flatten()
        .map(|s| Backend {
            name: s.name.clone(),
            hash: s
                .labels
                .as_ref()
                .and_then(|l| l.get(agent::POD_TEMPLATE_HASH))
                .cloned()
                .unwrap_or_default(),
        })
        .collect();
    let status = dr.status.as_ref();
    Applied {
        value: backends,
        changed_at: changed_at(&dr.metadata),
        synced: reconciled(
            &dr.metadata,
            status.and_then(|s| s.conditions.as_deref()),
            status.and_then(|s| s.observed_generation.as_ref()),
        ),
    }
}

/// `<service>.<namespace>.svc.cluster.local`.
pub fn fqdn(service: &str, ns: &str) -> String {
    format!("{service}.{ns}.svc.cluster.local")
}

fn destination_rule_spec(service: &str, ns: &str, backends: &[Backend]) -> DestinationRuleSpec {
    DestinationRuleSpec {
        host: fqdn(service, ns),
        subsets: (!backends.is_empty()).then(|| {
            backends
                .iter()
                .map(|s| DestinationRuleSubsets {
                    name: s.name.clone(),
                    labels: Some(BTreeMap::from([(agent::POD_TEMPLATE_HASH.into(), s.hash.clone())])),
                    ..DestinationRuleSubsets::default()
                })
                .collect()
        }),
        ..DestinationRuleSpec::default()
    }
}

fn virtual_service_spec(service: &str, ns: &str, route: &Route) -> VirtualServiceSpec {
    let host = fqdn(service, ns);
    let to = |subset: Option<&str>, weight: Option<u8>| VirtualServiceHttpRoute {
        destination: VirtualServiceHttpRouteDestination {
            host: host.clone(),
            subset: subset.map(str::to_owned),
            ..Default::default()
        },
        weight: weight.map(i32::from),
        ..Default::default()
    };
    let mut http = Vec::new();
    let mut weighted = VirtualServiceHttp {
        name: Some("turnout".into()),
        ..Default::default()
    };
    let destinations = match route {
        Route::Host => vec![to(None, None)],
        Route::Split(split) => {
            // The sticky backend's answers set the cookie, wherever they come from.
            let set_cookie = |dest: &mut VirtualServiceHttpRoute, backend: &str| {
                if let Some(s) = split.sticky.as_ref().filter(|s| s.backend == backend) {
                    dest.headers = Some(VirtualServiceHttpRouteHeaders {
                        response: Some(VirtualServiceHttpRouteHeadersResponse {
                            add: Some(BTreeMap::from([(SET_COOKIE.to_owned(), s.set_cookie())])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                }
            };
            if let Some(m) = &split.matched {
                let mut dest = to(Some(&m.backend), None);
                set_cookie(&mut dest, &m.backend);
                http.push(VirtualServiceHttp {
                    name: Some(MATCH_ROUTE.into()),
                    r#match: Some(m.matches.iter().map(http_match).collect()),
                    route: Some(vec![dest]),
                    ..Default::default()
                });
            }
            if let Some(m) = &split.mirror {
                weighted.mirror = Some(VirtualServiceHttpMirror {
                    host: host.clone(),
                    subset: Some(m.backend.clone()),
                    port: None,
                });
                weighted.mirror_percentage = Some(VirtualServiceHttpMirrorPercentage {
                    value: Some(f64::from(m.percent)),
                });
            }
            if let Some(s) = &split.sticky {
                http.push(VirtualServiceHttp {
                    name: Some(STICKY_ROUTE.into()),
                    r#match: Some(vec![VirtualServiceHttpMatch {
                        headers: Some(BTreeMap::from([(
                            "cookie".to_owned(),
                            VirtualServiceHttpMatchHeaders {
                                regex: Some(s.cookie_regex()),
                                ..Default::default()
                            },
                        )])),
                        ..Default::default()
                    }]),
                    route: Some(vec![to(Some(&s.backend), None)]),
                    ..Default::default()
                });
            }
            split
                .weights
                .iter()
                .map(|p| {
                    let mut dest = to(Some(&p.backend), Some(p.weight));
                    set_cookie(&mut dest, &p.backend);
                    dest
                })
                .collect()
        }
    };
    weighted.route = Some(destinations);
    http.push(weighted);
    VirtualServiceSpec {
        hosts: Some(vec![host]),
        http: Some(http),
        ..VirtualServiceSpec::default()
    }
}

/// A percentage Istio holds as a double, as a whole percent.
fn percent(value: f64) -> u8 {
    // Clamped to 0..=100 first: the conversion is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let whole = value.clamp(0.0, 100.0).round() as u8;
    whole
}

/// A match as Istio's `HTTPMatchRequest`: `exact` or `regex` (RE2, the whole value) per header and
/// query parameter.
fn http_match(m: &RequestMatch) -> VirtualServiceHttpMatch {
    let header = |v: &ValueMatch| VirtualServiceHttpMatchHeaders {
        exact: (v.kind == MatchKind::Exact).then(|| v.value.clone()),
        regex: (v.kind == MatchKind::RegularExpression).then(|| v.value.clone()),
        ..Default::default()
    };
    let param = |v: &ValueMatch| VirtualServiceHttpMatchQueryParams {
        exact: (v.kind == MatchKind::Exact).then(|| v.value.clone()),
        regex: (v.kind == MatchKind::RegularExpression).then(|| v.value.clone()),
        ..Default::default()
    };
    VirtualServiceHttpMatch {
        headers: (!m.headers.is_empty()).then(|| m.headers.iter().map(|v| (v.name.clone(), header(v))).collect()),
        query_params: (!m.query_params.is_empty())
            .then(|| m.query_params.iter().map(|v| (v.name.clone(), param(v))).collect()),
        ..Default::default()
    }
}

/// The match an `HTTPMatchRequest` of turnout's stands for.
fn request_match_of(m: &VirtualServiceHttpMatch) -> RequestMatch {
    let value = |name: &String, exact: &Option<String>, regex: &Option<String>| ValueMatch {
        name: name.clone(),
        value: exact.clone().or_else(|| regex.clone()).unwrap_or_default(),
        kind: if exact.is_some() {
            MatchKind::Exact
        } else {
            MatchKind::RegularExpression
        },
    };
    RequestMatch {
        headers: m
            .headers
            .iter()
            .flatten()
            .map(|(n, h)| value(n, &h.exact, &h.regex))
            .collect(),
        query_params: m
            .query_params
            .iter()
            .flatten()
            .map(|(n, q)| value(n, &q.exact, &q.regex))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::release::Managed;

    #[test]
    fn a_change_istio_reports_reconciled_counts_as_propagated() {
        let vs = |generation: i64, observed: serde_json::Value, status: &str| -> VirtualService {
            serde_json::from_value(json!({
                "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": { "name": "podinfo", "namespace": "shop", "generation": generation,
                              "labels": { "app.kubernetes.io/managed-by": "turnout" },
                              "annotations": { "turnout.dev/changed-at": "2026-11-22T00:00:00.000Z" } },
                "spec": {},
                "status": { "observedGeneration": observed, "conditions": [{
                    "type": "Reconciled", "status": status, "reason": "", "message": "",
                    "lastTransitionTime": "2026-11-22T00:00:01Z" }] }
            }))
            .unwrap()
        };
        let view = |v: VirtualService| {
            let stored = Stored {
                virtual_service: Some(v),
                destination_rule: None,
            };
            match observe("podinfo", &stored).route {
                Managed::Ours(v) => v,
                other => panic!("{other:?}"),
            }
        };
        let reported = view(vs(3, json!(3), "True"));
        assert_eq!(reported.synced, Synced::Reported);
        assert_eq!(reported.propagated(5_000), reported.changed_at);
        assert_eq!(
            view(vs(3, json!("2"), "True")).synced,
            Synced::Unknown,
            "an older generation says nothing"
        );
        assert_eq!(
            view(vs(3, json!("3"), "True")).synced,
            Synced::Reported,
            "Istio writes it as a string too"
        );
        let pending = view(vs(3, json!(3), "False"));
        assert_eq!(pending.synced, Synced::Unknown);
        assert_eq!(pending.propagated(5_000), pending.changed_at + 5_000);
    }

    #[test]
    fn istio_objects_without_turnout_s_label_are_foreign() {
        let vs: VirtualService = serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": { "name": "podinfo", "namespace": "shop" }, "spec": {}
        }))
        .unwrap();
        let stored = Stored {
            virtual_service: Some(vs),
            destination_rule: None,
        };
        let view = observe("podinfo", &stored);
        assert_eq!(
            view.route,
            Managed::Foreign {
                kind: "VirtualService",
                name: "shop/podinfo".into()
            }
        );
        assert_eq!(view.backends, Managed::Absent);
    }

    #[test]
    fn requests_that_match_go_first_to_their_backend_and_read_back() {
        let matches = crate::release::routing::parse_matches(
            r#"[{"headers":[{"name":"X-User-Group","value":"beta"}]},
                {"headers":[{"name":"cookie","value":"^(.*;)?beta=1(;.*)?$","type":"RegularExpression"}],
                 "queryParams":[{"name":"tier","value":"gold"}]}]"#,
        )
        .unwrap();
        let route = Route::Split(Split {
            weights: vec![
                Weighted {
                    backend: "v1".into(),
                    weight: 90,
                },
                Weighted {
                    backend: "v2-canary".into(),
                    weight: 10,
                },
            ],
            matched: Some(Matched {
                matches,
                backend: "v2-canary".into(),
            }),
            mirror: None,
            sticky: None,
        });
        let spec = virtual_service_spec("podinfo", "shop", &route);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["http"][0]["name"], "turnout-match");
        assert_eq!(json["http"][0]["match"][0]["headers"]["x-user-group"]["exact"], "beta");
        assert_eq!(
            json["http"][0]["match"][1]["headers"]["cookie"]["regex"],
            "^(.*;)?beta=1(;.*)?$"
        );
        assert_eq!(json["http"][0]["match"][1]["queryParams"]["tier"]["exact"], "gold");
        assert_eq!(json["http"][0]["route"][0]["destination"]["subset"], "v2-canary");
        assert_eq!(json["http"][1]["name"], "turnout");
        assert_eq!(json["http"][1]["route"][1]["weight"], 10);
        let vs = VirtualService::new("podinfo", spec);
        assert_eq!(route_of(&vs).value, route);
    }

    #[test]
    fn copies_go_to_the_mirror_subset_at_its_percentage_and_read_back() {
        let route = Route::Split(Split {
            weights: vec![Weighted {
                backend: "v1".into(),
                weight: 100,
            }],
            matched: None,
            mirror: Some(Mirror {
                backend: "v2-canary".into(),
                percent: 20,
            }),
            sticky: None,
        });
        let spec = virtual_service_spec("podinfo", "shop", &route);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["http"][0]["mirror"]["subset"], "v2-canary");
        assert_eq!(json["http"][0]["mirror"]["host"], "podinfo.shop.svc.cluster.local");
        assert_eq!(json["http"][0]["mirrorPercentage"]["value"], 20.0);
        assert_eq!(json["http"][0]["route"][0]["destination"]["subset"], "v1");
        assert_eq!(route_of(&VirtualService::new("podinfo", spec)).value, route);
    }

    #[test]
    fn an_a_b_test_with_affinity_sets_the_cookie_on_the_matched_route_and_reads_back() {
        let matches =
            crate::release::routing::parse_matches(r#"[{"queryParams":[{"name":"beta","value":"1"}]}]"#).unwrap();
        let route = Route::Split(Split {
            weights: vec![Weighted {
                backend: "v1".into(),
                weight: 100,
            }],
            matched: Some(Matched {
                matches,
                backend: "v2-canary".into(),
            }),
            mirror: None,
            sticky: Some(Sticky {
                cookie: "turnout-canary".into(),
                backend: "v2-canary".into(),
            }),
        });
        let spec = virtual_service_spec("podinfo", "shop", &route);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["http"][0]["name"], "turnout-match");
        assert_eq!(
            json["http"][0]["route"][0]["headers"]["response"]["add"]["set-cookie"],
            "turnout-canary=v2-canary; Path=/"
        );
        assert_eq!(json["http"][1]["name"], "turnout-sticky");
        assert_eq!(route_of(&VirtualService::new("podinfo", spec)).value, route);
    }

    #[test]
    fn a_blue_green_standby_sends_its_matches_and_copies_of_the_rest_and_reads_back() {
        let matches =
            crate::release::routing::parse_matches(r#"[{"headers":[{"name":"x-user-group","value":"beta"}]}]"#)
                .unwrap();
        let route = Route::Split(Split {
            weights: vec![Weighted {
                backend: "v1".into(),
                weight: 100,
            }],
            matched: Some(Matched {
                matches,
                backend: "v2-canary".into(),
            }),
            mirror: Some(Mirror {
                backend: "v2-canary".into(),
                percent: 50,
            }),
            sticky: None,
        });
        let spec = virtual_service_spec("podinfo", "shop", &route);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["http"][0]["name"], "turnout-match");
        assert_eq!(json["http"][0]["route"][0]["destination"]["subset"], "v2-canary");
        assert_eq!(json["http"][1]["mirror"]["subset"], "v2-canary");
        assert_eq!(json["http"][1]["mirrorPercentage"]["value"], 50.0);
        assert_eq!(json["http"][1]["route"][0]["destination"]["subset"], "v1");
        assert_eq!(route_of(&VirtualService::new("podinfo", spec)).value, route);
    }

    #[test]
    fn a_sticky_canary_sets_its_cookie_and_keeps_whoever_carries_it_and_reads_back() {
        let route = Route::Split(Split {
            weights: vec![
                Weighted {
                    backend: "v1".into(),
                    weight: 80,
                },
                Weighted {
                    backend: "v2-canary".into(),
                    weight: 20,
                },
            ],
            matched: None,
            mirror: None,
            sticky: Some(Sticky {
                cookie: "turnout-canary".into(),
                backend: "v2-canary".into(),
            }),
        });
        let spec = virtual_service_spec("podinfo", "shop", &route);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["http"][0]["name"], "turnout-sticky");
        assert_eq!(
            json["http"][0]["match"][0]["headers"]["cookie"]["regex"],
            r"^(.*?;\s*)?turnout\-canary=v2\-canary(;.*)?$"
        );
        assert_eq!(json["http"][0]["route"][0]["destination"]["subset"], "v2-canary");
        let weighted = &json["http"][1]["route"];
        assert!(weighted[0]["headers"].is_null(), "the stable version sets no cookie");
        assert_eq!(
            weighted[1]["headers"]["response"]["add"]["set-cookie"],
            "turnout-canary=v2-canary; Path=/"
        );
        assert_eq!(route_of(&VirtualService::new("podinfo", spec)).value, route);
    }

    #[test]
    fn weights_and_subsets_round_trip_through_the_objects() {
        let route = Route::weights(vec![
            Weighted {
                backend: "v1".into(),
                weight: 75,
            },
            Weighted {
                backend: "v2-canary".into(),
                weight: 25,
            },
        ]);
        let vs = VirtualService::new("podinfo", virtual_service_spec("podinfo", "shop", &route));
        assert_eq!(route_of(&vs).value, route);
        let host = VirtualService::new("podinfo", virtual_service_spec("podinfo", "shop", &Route::Host));
        assert_eq!(route_of(&host).value, Route::Host);
        let backends = vec![Backend {
            name: "v1".into(),
            hash: "abc".into(),
        }];
        let dr = DestinationRule::new("podinfo", destination_rule_spec("podinfo", "shop", &backends));
        assert_eq!(backends_of(&dr).value, backends);
    }
}
