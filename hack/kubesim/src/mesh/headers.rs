//! Header manipulation as routes configure it — Istio's `headers.request` / `headers.response` (on an
//! `http` route and on each of its destinations), the Gateway API's `RequestHeaderModifier` /
//! `ResponseHeaderModifier` filters (on a rule and on each backendRef) — and the helpers of request
//! mirroring: the share of requests mirrored, and the `-shadow` authority of a mirrored request.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::rng::Rng;
use super::route::split_authority;

/// What a change is for: requests cannot change `Host` (Envoy refuses a header option on `host` or a
/// pseudo-header; rewriting the authority is another feature, not simulated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// The header changes of one level, applied as Envoy applies one level's options: every `remove`
/// first, then every `set` (replacing all values of the name), then every `add` (one more value beside
/// those present, e.g. a `Set-Cookie` beside the pod's own).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderOps {
    /// The changes of an Istio `HeadersOperations` (`set` and `add` maps, `remove` list) or of a Gateway
    /// API `HTTPHeaderFilter` (`set` and `add` lists of `{name, value}`, `remove` list). Entries with an
    /// invalid name or value, or on `Host` (or a pseudo-header) for a request, are left out.
    pub fn of(v: &Value, side: Side) -> Self {
        let allowed =
            |name: &str| side == Side::Response || !(name.eq_ignore_ascii_case("host") || name.starts_with(':'));
        let pairs = |v: &Value| -> Vec<(HeaderName, HeaderValue)> {
            let raw: Vec<(&str, &str)> = match v {
                Value::Object(map) => map
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                    .collect(),
                Value::Array(list) => list
                    .iter()
                    .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
                    .collect(),
                _ => Vec::new(),
            };
            raw.into_iter()
                .filter(|(name, _)| allowed(name))
                .filter_map(|(name, value)| {
                    Some((
                        HeaderName::from_bytes(name.as_bytes()).ok()?,
                        HeaderValue::from_str(value).ok()?,
                    ))
                })
                .collect()
        };
        Self {
            remove: v["remove"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter(|name| allowed(name))
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect(),
            set: pairs(&v["set"]),
            add: pairs(&v["add"]),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Changes `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// The request and response changes of one level.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Headers {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

impl Headers {
    /// Istio's `Headers` object (`{request: {...}, response: {...}}`); absent: no change.
    pub fn of_istio(v: &Value) -> Self {
        Self {
            request: HeaderOps::of(&v["request"], Side::Request),
            response: HeaderOps::of(&v["response"], Side::Response),
        }
    }
}

/// Applies the changes of several levels in order.
pub fn apply_all(levels: &[HeaderOps], headers: &mut HeaderMap) {
    for ops in levels {
        ops.apply(headers);
    }
}

/// The non-empty levels among `levels`, in order (most specific first: see [`super::route::Upstream`]).
pub fn levels<'a>(levels: impl IntoIterator<Item = &'a HeaderOps>) -> Vec<HeaderOps> {
    levels.into_iter().filter(|l| !l.is_empty()).cloned().collect()
}

/// The authority of a mirrored request, as Envoy writes it: `-shadow` after the host, before any port
/// (`podinfo.test:80` → `podinfo.test-shadow:80`).
pub fn shadow_authority(authority: &str) -> String {
    match split_authority(authority) {
        (host, Some(port)) => format!("{host}-shadow:{port}"),
        (host, None) => format!("{host}-shadow"),
    }
}

/// A mirror share in percent from an Istio `Percent` (`{value: <double>}`): absent `value` is 0, as
/// protobuf reads it; clamped to 0–100.
pub fn istio_percent(v: &Value) -> f64 {
    clamp_percent(v["value"].as_f64().unwrap_or(0.0))
}

/// A Gateway API `HTTPRequestMirrorFilter`'s share in percent: `percent`, or `fraction`
/// (`numerator / denominator`, the denominator 100 by default); neither: 100.
pub fn gateway_percent(filter: &Value) -> f64 {
    if let Some(p) = filter["percent"].as_f64() {
        return clamp_percent(p);
    }
    let fraction = &filter["fraction"];
    if fraction.is_object() {
        let numerator = fraction["numerator"].as_f64().unwrap_or(0.0);
        let denominator = fraction["denominator"].as_f64().unwrap_or(100.0);
        if denominator <= 0.0 {
            return 0.0;
        }
        return clamp_percent(numerator * 100.0 / denominator);
    }
    100.0
}

pub fn clamp_percent(p: f64) -> f64 {
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) }
}

/// Whether one request is among the `percent` mirrored (drawing from `rng` only for a partial share).
pub fn mirrored(percent: f64, rng: &mut Rng) -> bool {
    if percent >= 100.0 {
        true
    } else if percent.is_nan() || percent <= 0.0 {
        false
    } else {
        rng.unit() * 100.0 < percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect()
    }

    #[test]
    fn remove_then_set_then_add_in_both_api_forms() {
        let istio = HeaderOps::of(
            &json!({"set": {"x-a": "1", "Content-Type": "text/plain"}, "add": {"set-cookie": "canary=always"},
                "remove": ["x-gone"]}),
            Side::Response,
        );
        let gateway = HeaderOps::of(
            &json!({"set": [{"name": "x-a", "value": "1"}, {"name": "Content-Type", "value": "text/plain"}],
                "add": [{"name": "Set-Cookie", "value": "canary=always"}], "remove": ["X-Gone"]}),
            Side::Response,
        );
        for ops in [istio, gateway] {
            let mut h = HeaderMap::new();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.append("set-cookie", HeaderValue::from_static("session=1"));
            h.insert("x-gone", HeaderValue::from_static("soon"));
            h.insert("x-kept", HeaderValue::from_static("yes"));
            ops.apply(&mut h);
            assert_eq!(values(&h, "content-type"), ["text/plain"], "set replaces");
            assert_eq!(values(&h, "set-cookie"), ["session=1", "canary=always"], "add appends");
            assert!(h.get("x-gone").is_none(), "removed");
            assert_eq!(values(&h, "x-a"), ["1"], "set adds what is absent");
            assert_eq!(values(&h, "x-kept"), ["yes"]);
        }
    }

    #[test]
    fn a_set_and_an_add_of_one_name_give_both_and_later_levels_win_a_set() {
        let destination = HeaderOps::of(&json!({"set": {"x-v": "dest"}}), Side::Response);
        let route = HeaderOps::of(&json!({"add": {"x-v": "route"}}), Side::Response);
        let mut h = HeaderMap::new();
        apply_all(&[destination.clone(), route], &mut h);
        assert_eq!(values(&h, "x-v"), ["dest", "route"]);
        let overriding = HeaderOps::of(&json!({"set": {"x-v": "route"}}), Side::Response);
        let mut h = HeaderMap::new();
        apply_all(&[destination, overriding], &mut h);
        assert_eq!(values(&h, "x-v"), ["route"]);
    }

    #[test]
    fn requests_cannot_change_host_and_invalid_entries_are_left_out() {
        let ops = HeaderOps::of(
            &json!({"set": {"Host": "elsewhere", ":authority": "x", "bad name": "v", "x-ok": "1"},
                "remove": ["host"], "add": {"x-nl": "a\nb"}}),
            Side::Request,
        );
        assert_eq!(ops.set.len(), 1, "{ops:?}");
        assert_eq!(ops.set[0].0, "x-ok");
        assert!(ops.remove.is_empty() && ops.add.is_empty(), "{ops:?}");
        assert!(HeaderOps::of(&json!(null), Side::Request).is_empty());
        let response = HeaderOps::of(&json!({"remove": ["host"]}), Side::Response);
        assert_eq!(response.remove.len(), 1);
    }

    #[test]
    fn the_shadow_suffix_goes_after_the_host_before_the_port() {
        assert_eq!(shadow_authority("podinfo.test"), "podinfo.test-shadow");
        assert_eq!(shadow_authority("podinfo.test:80"), "podinfo.test-shadow:80");
        assert_eq!(
            shadow_authority("podinfo.example.com:8080"),
            "podinfo.example.com-shadow:8080"
        );
    }

    #[test]
    fn mirror_shares_follow_both_apis() {
        assert_eq!(istio_percent(&json!({"value": 12.5})), 12.5);
        assert_eq!(
            istio_percent(&json!({})),
            0.0,
            "an explicit empty percentage mirrors nothing"
        );
        assert_eq!(istio_percent(&json!({"value": 150})), 100.0);
        assert_eq!(gateway_percent(&json!({"backendRef": {"name": "x"}})), 100.0);
        assert_eq!(gateway_percent(&json!({"percent": 30})), 30.0);
        assert_eq!(
            gateway_percent(&json!({"fraction": {"numerator": 1, "denominator": 4}})),
            25.0
        );
        assert_eq!(gateway_percent(&json!({"fraction": {"numerator": 7}})), 7.0);
        assert_eq!(
            gateway_percent(&json!({"fraction": {"numerator": 1, "denominator": 0}})),
            0.0
        );
    }

    #[test]
    fn the_share_mirrored_is_honoured_statistically() {
        let mut rng = Rng::new(11);
        let hits = (0..10_000).filter(|_| mirrored(25.0, &mut rng)).count();
        assert!((2_300..2_700).contains(&hits), "{hits}");
        assert!((0..100).all(|_| mirrored(100.0, &mut rng)));
        assert!((0..100).all(|_| !mirrored(0.0, &mut rng)));
        assert!(!mirrored(f64::NAN, &mut rng));
    }
}
