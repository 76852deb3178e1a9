//! Label and field selectors, in the string forms of the list and watch query parameters.

use serde_json::Value;

/// Why a selector could not be parsed (400 Bad Request).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unable to parse requirement {requirement:?}: {reason}")]
pub struct SelectorError {
    pub requirement: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed label selector: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    /// Parses `app=web,tier!=db,env in (a,b),env notin (c),key,!key`.
    ///
    /// # Errors
    ///
    /// A requirement that is not of one of those forms.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut out = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let err = |reason| SelectorError {
                requirement: part.to_owned(),
                reason,
            };
            let req = if let Some(key) = part.strip_prefix('!') {
                Requirement {
                    key: key.trim().to_owned(),
                    op: Op::DoesNotExist,
                }
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement {
                    key: k.trim().to_owned(),
                    op: Op::NotEq(v.trim().to_owned()),
                }
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement {
                    key: k.trim().to_owned(),
                    op: Op::Eq(v.trim().to_owned()),
                }
            } else if let Some((k, rest)) = split_word(part, " notin ") {
                Requirement {
                    key: k,
                    op: Op::NotIn(set(rest).ok_or_else(|| err("expected a (set)"))?),
                }
            } else if let Some((k, rest)) = split_word(part, " in ") {
                Requirement {
                    key: k,
                    op: Op::In(set(rest).ok_or_else(|| err("expected a (set)"))?),
                }
            } else {
                Requirement {
                    key: part.to_owned(),
                    op: Op::Exists,
                }
            };
            if req.key.is_empty() || req.key.contains(char::is_whitespace) {
                return Err(err("invalid label key"));
            }
            out.push(req);
        }
        Ok(Self(out))
    }

    /// A selector from the structured form (`matchLabels`, `matchExpressions`) of a LabelSelector object.
    /// An empty structured selector matches everything; `None` (absent) matches nothing, as upstream.
    pub fn from_object(selector: &Value) -> Self {
        let mut out = Vec::new();
        if let Some(labels) = selector["matchLabels"].as_object() {
            for (k, v) in labels {
                out.push(Requirement {
                    key: k.clone(),
                    op: Op::Eq(v.as_str().unwrap_or_default().to_owned()),
                });
            }
        }
        for e in selector["matchExpressions"].as_array().into_iter().flatten() {
            let key = e["key"].as_str().unwrap_or_default().to_owned();
            let values: Vec<String> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            let op = match e["operator"].as_str() {
                Some("In") => Op::In(values),
                Some("NotIn") => Op::NotIn(values),
                Some("Exists") => Op::Exists,
                _ => Op::DoesNotExist,
            };
            out.push(Requirement { key, op });
        }
        Self(out)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `labels` (a JSON object of strings, or null) satisfies every requirement.
    pub fn matches(&self, labels: &Value) -> bool {
        self.0.iter().all(|r| {
            let v = labels.get(&r.key).and_then(Value::as_str);
            match &r.op {
                Op::Eq(want) => v == Some(want.as_str()),
                Op::NotEq(want) => v != Some(want.as_str()),
                Op::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
                Op::NotIn(set) => v.is_none_or(|v| set.iter().all(|s| s != v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
            }
        })
    }
}

/// A parsed field selector: `metadata.name=x,status.phase!=Running`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// # Errors
    ///
    /// A requirement without `=`, `==` or `!=`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, equal, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, true, v)
            } else {
                return Err(SelectorError {
                    requirement: part.to_owned(),
                    reason: "expected a field=value pair",
                });
            };
            out.push((path.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(out))
    }

    /// Whether `object` satisfies every requirement; a field that is absent reads as "".
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, want)| {
            let mut cur = object;
            for key in path.split('.') {
                cur = &cur[key];
            }
            let got = match cur {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (got == *want) == *equal
        })
    }
}

fn split_top_level(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn split_word(part: &str, word: &str) -> Option<(String, String)> {
    part.find(word)
        .map(|i| (part[..i].trim().to_owned(), part[i + word.len()..].trim().to_owned()))
}

fn set(s: String) -> Option<Vec<String>> {
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_operator_of_the_string_form_matches_as_upstream() {
        let labels = json!({"app": "web", "tier": "front", "env": "prod"});
        let yes = [
            "app=web",
            "app==web",
            "tier!=db",
            "env in (prod,staging)",
            "env notin (dev)",
            "app",
            "!missing",
            "app=web,env in (prod)",
            "",
        ];
        let no = [
            "app=api",
            "tier!=front",
            "env in (dev)",
            "env notin (prod)",
            "missing",
            "!app",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&labels), "{s}");
        }
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&labels), "{s}");
        }
    }

    #[test]
    fn a_malformed_set_is_an_error() {
        assert!(LabelSelector::parse("env in prod").is_err());
    }

    #[test]
    fn the_structured_form_matches_labels_and_expressions() {
        let s = LabelSelector::from_object(&json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}));
        assert!(s.matches(&json!({"app": "web", "tier": "front"})));
        assert!(!s.matches(&json!({"app": "web", "tier": "db"})));
        assert!(!s.matches(&Value::Null));
    }

    #[test]
    fn field_selectors_read_dotted_paths() {
        let pod = json!({"metadata": {"name": "a", "namespace": "x"}, "status": {"phase": "Running"}});
        assert!(
            FieldSelector::parse("metadata.name=a,status.phase!=Pending")
                .unwrap()
                .matches(&pod)
        );
        assert!(!FieldSelector::parse("metadata.namespace=y").unwrap().matches(&pod));
        assert!(FieldSelector::parse("spec.nodeName=").unwrap().matches(&pod));
    }
}
