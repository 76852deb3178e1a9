//! Strategic merge patch (`application/strategic-merge-patch+json`) for the built-in kinds kubesim serves.
//!
//! This follows kube-apiserver (`k8s.io/apimachinery/pkg/util/strategicpatch`, as driven by the Go struct
//! tags `patchStrategy`/`patchMergeKey` of `k8s.io/api`), with the struct tags replaced by a small table
//! ([`list_merge`]) of the list fields that merge instead of being replaced:
//!
//! - maps merge recursively, `null` deletes a key, scalars and lists without a table entry are replaced;
//! - lists with a merge key merge element by element, elements absent from the patch stay;
//! - primitive lists with the merge strategy (`metadata.finalizers`) become the union of both lists;
//! - the directives `$patch` (`replace`, `delete`, `merge`), `$retainKeys`, `$deleteFromPrimitiveList/<field>`
//!   and `$setElementOrder/<field>` are honoured and never appear in the result.
//!
//! Ordering follows upstream too: without `$setElementOrder`, the elements named by the patch keep the
//! patch's order and are interleaved with the untouched elements by their position in the original list, so
//! an element that is new *precedes* the untouched ones (`[a, b]` patched with `[c]` gives `[c, a, b]`).
//!
//! Where upstream leaves odd artefacts, this module cleans up: a map or list the original did not have is
//! still run through the patch logic (so its `null`s and directives do not leak into the stored object), and
//! `$deleteFromPrimitiveList` on a list the original lacks is a no-op instead of creating the list.

use std::collections::HashSet;

use serde_json::{Map, Value};

/// The key of the `$patch` directive, in maps and in list elements.
const PATCH_DIRECTIVE: &str = "$patch";
/// The key of the directive that keeps only the listed keys of a map.
const RETAIN_KEYS: &str = "$retainKeys";
/// The prefix of the parallel list naming values to remove from a primitive list.
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";
/// The prefix of the parallel list giving the order of a merged list.
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";

/// Why a strategic merge patch could not be applied (the apiserver answers 422/400 with it).
///
/// `path` fields name the place in the object with dots between fields and `[]` for list elements, e.g.
/// `spec.template.spec.containers[].env`; `<root>` is the object itself.
#[derive(Debug, thiserror::Error)]
pub enum StrategicError {
    /// The kind has no Go type in the apiserver (a custom resource): it answers 415 Unsupported Media Type.
    #[error("strategic merge patch is not supported for kind {kind:?}")]
    UnsupportedKind {
        /// The kind the patch was for.
        kind: String,
    },
    /// A value that has to be a JSON object (the patch, the object, an element of a keyed list) is not.
    #[error("{path}: expected a JSON object")]
    NotAnObject {
        /// Where the value is.
        path: String,
    },
    /// A value that has to be a JSON array (a list field the patch orders) is not.
    #[error("{path}: expected a JSON array")]
    NotAList {
        /// Where the value is.
        path: String,
    },
    /// An element of a primitive list with merge strategy is an object or an array.
    #[error("{path}: expected a scalar list element")]
    NotAScalar {
        /// Where the element is.
        path: String,
    },
    /// An element of a list that merges by key lacks the key.
    #[error("{path}: list element has no merge key {key:?}")]
    MissingMergeKey {
        /// The list element's place.
        path: String,
        /// The merge key of the list.
        key: &'static str,
    },
    /// A directive has a value it cannot have (`$patch: foo`, `$retainKeys: "x"`, ...).
    #[error("{path}: invalid {directive}: {reason}")]
    InvalidDirective {
        /// The map holding the directive.
        path: String,
        /// The directive's key.
        directive: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A key starting with `$` that is no directive of strategic merge patch.
    #[error("{path}: unknown patch directive {directive:?}")]
    UnknownDirective {
        /// The map holding the key.
        path: String,
        /// The key.
        directive: String,
    },
    /// The patch sets a field that its own `$retainKeys` list drops.
    #[error("{path}: field {field:?} is set by the patch but missing from $retainKeys")]
    NotInRetainKeys {
        /// The map holding the directive.
        path: String,
        /// The field.
        field: String,
    },
    /// The patch list names elements in another order than its `$setElementOrder` list, or names elements
    /// the order list lacks.
    #[error("{path}: the order of the patch list does not match its $setElementOrder list")]
    ElementOrderMismatch {
        /// The list field.
        path: String,
    },
}

/// How a list field merges when it is not replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListMerge {
    /// A list of objects merged element-wise by the value of this key (`patchMergeKey`).
    ByKey(&'static str),
    /// A list of scalars merged as an ordered set (`patchStrategy: merge` without a key).
    Set,
}

impl ListMerge {
    /// What identifies `element` in a list merged this way: the merge key's value, or the scalar itself.
    fn identity(self, element: &Value) -> Option<&Value> {
        match self {
            Self::ByKey(key) => element.as_object()?.get(key),
            Self::Set => Some(element),
        }
    }
}

/// One row of the merge table: a list field (`path` relative to where the rows are embedded) and how it
/// merges, or a struct embedded at `path` whose own rows apply below it.
struct Entry {
    path: &'static str,
    rule: Rule,
}

enum Rule {
    List(ListMerge),
    Embed(&'static [Entry]),
}

/// A list merged by `key`.
const fn keyed(path: &'static str, key: &'static str) -> Entry {
    Entry {
        path,
        rule: Rule::List(ListMerge::ByKey(key)),
    }
}

/// A primitive list merged as a set.
const fn set(path: &'static str) -> Entry {
    Entry {
        path,
        rule: Rule::List(ListMerge::Set),
    }
}

/// The rows of a struct that appears at `path`.
const fn embed(path: &'static str, entries: &'static [Entry]) -> Entry {
    Entry {
        path,
        rule: Rule::Embed(entries),
    }
}

/// Which kinds a group of rows applies to.
enum Kinds {
    /// Every kind this module accepts.
    All,
    /// Only these.
    Only(&'static [&'static str]),
}

/// Rows that apply to some kinds, with paths from the object root.
struct KindRules {
    kinds: Kinds,
    entries: &'static [Entry],
}

/// `metav1.ObjectMeta`.
const OBJECT_META: &[Entry] = &[keyed("ownerReferences", "uid"), set("finalizers")];

/// `core/v1.Container` and `EphemeralContainer`.
const CONTAINER: &[Entry] = &[
    keyed("ports", "containerPort"),
    keyed("env", "name"),
    keyed("volumeMounts", "mountPath"),
    keyed("volumeDevices", "devicePath"),
];

/// `core/v1.PodSpec`. `tolerations`, `readinessGates` and the rest replace.
const POD_SPEC: &[Entry] = &[
    keyed("containers", "name"),
    embed("containers[]", CONTAINER),
    keyed("initContainers", "name"),
    embed("initContainers[]", CONTAINER),
    keyed("ephemeralContainers", "name"),
    embed("ephemeralContainers[]", CONTAINER),
    keyed("volumes", "name"),
    keyed("imagePullSecrets", "name"),
    keyed("hostAliases", "ip"),
    keyed("topologySpreadConstraints", "topologyKey"),
    keyed("schedulingGates", "name"),
    keyed("resourceClaims", "name"),
];

/// `core/v1.PodTemplateSpec`.
const POD_TEMPLATE_SPEC: &[Entry] = &[embed("metadata", OBJECT_META), embed("spec", POD_SPEC)];

/// `core/v1.PodStatus`.
const POD_STATUS: &[Entry] = &[
    keyed("conditions", "type"),
    keyed("podIPs", "ip"),
    keyed("hostIPs", "ip"),
    keyed("resourceClaimStatuses", "name"),
];

/// The kinds whose `spec.template` is a pod template.
const POD_TEMPLATE_OWNERS: &[&str] = &[
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "ReplicationController",
];

/// The kinds whose `status.conditions` merge by `type`.
const CONDITION_OWNERS: &[&str] = &[
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "ReplicationController",
    "Namespace",
    "PersistentVolumeClaim",
    "Service",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "APIService",
];

/// The list fields that merge, per kind. Everything else replaces.
static TABLE: &[KindRules] = &[
    KindRules {
        kinds: Kinds::All,
        entries: &[embed("metadata", OBJECT_META)],
    },
    KindRules {
        kinds: Kinds::Only(&["Pod"]),
        entries: &[embed("spec", POD_SPEC), embed("status", POD_STATUS)],
    },
    KindRules {
        kinds: Kinds::Only(&["PodTemplate"]),
        entries: &[embed("template", POD_TEMPLATE_SPEC)],
    },
    KindRules {
        kinds: Kinds::Only(POD_TEMPLATE_OWNERS),
        entries: &[embed("spec.template", POD_TEMPLATE_SPEC)],
    },
    KindRules {
        kinds: Kinds::Only(&["CronJob"]),
        entries: &[
            embed("spec.jobTemplate.metadata", OBJECT_META),
            embed("spec.jobTemplate.spec.template", POD_TEMPLATE_SPEC),
        ],
    },
    KindRules {
        kinds: Kinds::Only(CONDITION_OWNERS),
        entries: &[keyed("status.conditions", "type")],
    },
    KindRules {
        kinds: Kinds::Only(&["Service"]),
        entries: &[keyed("spec.ports", "port")],
    },
    KindRules {
        kinds: Kinds::Only(&["Node"]),
        entries: &[
            set("spec.podCIDRs"),
            keyed("status.conditions", "type"),
            keyed("status.addresses", "type"),
        ],
    },
    KindRules {
        kinds: Kinds::Only(&["ServiceAccount"]),
        entries: &[keyed("secrets", "name")],
    },
    KindRules {
        kinds: Kinds::Only(&["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]),
        entries: &[keyed("webhooks", "name")],
    },
];

/// The built-in kinds: the apiserver has Go types for them and so accepts strategic merge patches.
const BUILT_IN_KINDS: &[&str] = &[
    // core/v1
    "Binding",
    "ConfigMap",
    "Endpoints",
    "Event",
    "LimitRange",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Pod",
    "PodTemplate",
    "ReplicationController",
    "ResourceQuota",
    "Secret",
    "Service",
    "ServiceAccount",
    // apps/v1
    "ControllerRevision",
    "DaemonSet",
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    // batch/v1
    "CronJob",
    "Job",
    // autoscaling, policy
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    // coordination, discovery, networking
    "Lease",
    "EndpointSlice",
    "Ingress",
    "IngressClass",
    "NetworkPolicy",
    // rbac.authorization.k8s.io/v1
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    // storage, scheduling, node
    "CSIDriver",
    "CSINode",
    "StorageClass",
    "VolumeAttachment",
    "PriorityClass",
    "RuntimeClass",
    // admissionregistration, apiextensions, apiregistration, certificates
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "CustomResourceDefinition",
    "APIService",
    "CertificateSigningRequest",
];

/// Whether the apiserver accepts strategic merge patches for `kind` (it has a Go type for it).
pub fn is_supported(kind: &str) -> bool {
    BUILT_IN_KINDS.contains(&kind)
}

/// How the list field at `path` of a `kind` merges, or `None` when it is replaced (or is no list).
///
/// `path` goes from the object root, one field name per segment, with a `"[]"` segment (or a `[]` suffix)
/// to step into list elements: `["spec", "template", "spec", "containers", "[]", "env"]` → `ByKey("name")`.
pub fn list_merge(kind: &str, path: &[&str]) -> Option<ListMerge> {
    let mut joined = String::new();
    for segment in path {
        if *segment != "[]" && !joined.is_empty() {
            joined.push('.');
        }
        joined.push_str(segment);
    }
    lookup(kind, &joined)
}

/// The merge key of the list field at `path` of a `kind` (see [`list_merge`] for the path), e.g.
/// `spec.template.spec.containers` of a Deployment → `name`. `None` for lists that replace and for primitive
/// lists that merge as sets.
pub fn merge_key(kind: &str, path: &[&str]) -> Option<&'static str> {
    match list_merge(kind, path)? {
        ListMerge::ByKey(key) => Some(key),
        ListMerge::Set => None,
    }
}

/// [`list_merge`] with the path already joined (`spec.template.spec.containers[].env`).
fn lookup(kind: &str, path: &str) -> Option<ListMerge> {
    TABLE
        .iter()
        .filter(|rules| match rules.kinds {
            Kinds::All => true,
            Kinds::Only(kinds) => kinds.contains(&kind),
        })
        .find_map(|rules| lookup_in(rules.entries, path))
}

fn lookup_in(entries: &[Entry], path: &str) -> Option<ListMerge> {
    entries.iter().find_map(|entry| match entry.rule {
        Rule::List(merge) => (entry.path == path).then_some(merge),
        Rule::Embed(inner) => {
            let rest = path.strip_prefix(entry.path)?.strip_prefix('.')?;
            lookup_in(inner, rest)
        }
    })
}

/// Applies `patch` to `original` (both whole objects of `kind`, e.g. "Deployment", "Pod", "Service",
/// "ReplicaSet", "Namespace", "ConfigMap", "Secret", "ServiceAccount", "Event", "Lease", "EndpointSlice",
/// RBAC kinds...). Kinds without a Go type in the apiserver (custom resources) give
/// [`StrategicError::UnsupportedKind`].
pub fn apply(kind: &str, original: &Value, patch: &Value) -> Result<Value, StrategicError> {
    if !is_supported(kind) {
        return Err(StrategicError::UnsupportedKind { kind: kind.to_owned() });
    }
    let Value::Object(patch) = patch else {
        return Err(StrategicError::NotAnObject { path: at("") });
    };
    let Value::Object(original) = original else {
        return Err(StrategicError::NotAnObject {
            path: "<original object>".to_owned(),
        });
    };
    let merged = Merger { kind }.merge_map(original.clone(), patch, "")?;
    Ok(Value::Object(merged))
}

/// The path for an error message.
fn at(path: &str) -> String {
    if path.is_empty() {
        "<root>".to_owned()
    } else {
        path.to_owned()
    }
}

/// The path of field `key` of the map at `path`.
fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The path of the elements of the list at `path`.
fn elements(path: &str) -> String {
    format!("{path}[]")
}

/// Equality of merge-key values and primitive list elements, as Go compares the decoded JSON: numbers by
/// value, whatever their representation.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64().zip(y.as_f64()).is_some_and(|(x, y)| x == y),
        _ => a == b,
    }
}

/// Whether two optional identities are present and equal.
fn same_identity(a: Option<&Value>, b: Option<&Value>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if same(a, b))
}

/// The position of the element identified like `element` in `list`.
fn position<'a>(list: impl IntoIterator<Item = &'a Value>, element: &Value, merge: ListMerge) -> Option<usize> {
    let identity = merge.identity(element)?;
    list.into_iter()
        .position(|candidate| same_identity(merge.identity(candidate), Some(identity)))
}

/// Upstream's `normalizeElementOrder`: splits `items` into those named by `preferred` (ordered like it) and
/// the others (ordered like `server`), then interleaves both, taking an untouched element first only when
/// both it and the next named element are in `server` and it comes earlier there.
fn normalize_order(items: Vec<Value>, preferred: &[&Value], server: &[Value], merge: ListMerge) -> Vec<Value> {
    let (mut named, mut others): (Vec<Value>, Vec<Value>) = items
        .into_iter()
        .partition(|item| position(preferred.iter().copied(), item, merge).is_some());
    named.sort_by_key(|item| position(preferred.iter().copied(), item, merge));
    others.sort_by_key(|item| position(server, item, merge).unwrap_or(usize::MAX));

    let mut out = Vec::with_capacity(named.len() + others.len());
    let mut named = named.into_iter().peekable();
    let mut others = others.into_iter().peekable();
    loop {
        let take_other = match (others.peek(), named.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(other), Some(first_named)) => {
                let other_at = position(server, other, merge);
                let named_at = position(server, first_named, merge);
                matches!((other_at, named_at), (Some(o), Some(n)) if o < n)
            }
        };
        let next = if take_other { others.next() } else { named.next() };
        out.extend(next);
    }
    out
}

/// Applies patches to the objects of one kind.
struct Merger<'k> {
    kind: &'k str,
}

impl Merger<'_> {
    /// How the list at `path` merges, if it does.
    fn strategy(&self, path: &str) -> Option<ListMerge> {
        lookup(self.kind, path)
    }

    /// Merges the patch map `patch` into `original` (upstream's `mergeMap`).
    fn merge_map(
        &self,
        mut original: Map<String, Value>,
        patch: &Map<String, Value>,
        path: &str,
    ) -> Result<Map<String, Value>, StrategicError> {
        if let Some(directive) = patch.get(PATCH_DIRECTIVE) {
            match directive.as_str() {
                Some("replace") => {
                    let mut replacement = patch.clone();
                    replacement.remove(PATCH_DIRECTIVE);
                    return self.merge_map(Map::new(), &replacement, path);
                }
                // Upstream leaves an empty map where the deleted one was.
                Some("delete") => return Ok(Map::new()),
                Some("merge") => {}
                _ => {
                    return Err(invalid(
                        path,
                        PATCH_DIRECTIVE,
                        "must be \"replace\", \"delete\" or \"merge\"",
                    ));
                }
            }
        }

        if let Some(retain) = patch.get(RETAIN_KEYS) {
            retain_keys(&mut original, patch, retain, path)?;
        }

        // `$setElementOrder/<field>` first: it merges its list together with the ordering.
        let mut ordered: HashSet<&str> = HashSet::new();
        for (key, order) in patch {
            let Some(field) = key.strip_prefix(SET_ELEMENT_ORDER) else {
                continue;
            };
            if self.set_element_order(&mut original, patch, field, order, path)? {
                ordered.insert(field);
            }
        }

        let mut deletions = Vec::new();
        for (key, value) in patch {
            if key == PATCH_DIRECTIVE || key == RETAIN_KEYS || key.starts_with(SET_ELEMENT_ORDER) {
                continue;
            }
            if let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) {
                let Value::Array(values) = value else {
                    return Err(invalid(path, key, "must be a list"));
                };
                deletions.push((field, values));
                continue;
            }
            if key.starts_with('$') {
                return Err(StrategicError::UnknownDirective {
                    path: at(path),
                    directive: key.clone(),
                });
            }
            if ordered.contains(key.as_str()) {
                continue;
            }
            if value.is_null() {
                original.remove(key);
                continue;
            }
            let key_path = child(path, key);
            let slot = original.entry(key.clone()).or_insert(Value::Null);
            let current = std::mem::take(slot);
            *slot = self.merge_value(current, value, &key_path)?;
        }

        // Removals from primitive lists come last, after any additions to the same list.
        for (field, values) in deletions {
            if let Some(Value::Array(list)) = original.get_mut(field) {
                list.retain(|item| !values.iter().any(|value| same(item, value)));
            }
        }
        Ok(original)
    }

    /// Merges one patch value into the original's value for the same field (`Null` when it has none).
    fn merge_value(&self, current: Value, patch: &Value, path: &str) -> Result<Value, StrategicError> {
        match (current, patch) {
            (Value::Object(current), Value::Object(map)) => Ok(Value::Object(self.merge_map(current, map, path)?)),
            (Value::Array(current), Value::Array(list)) => match self.strategy(path) {
                Some(merge) => Ok(Value::Array(self.merge_list(current, list, merge, path)?)),
                None => self.fresh(patch, path),
            },
            _ => self.fresh(patch, path),
        }
    }

    /// A patch value that replaces whatever the original had, with its nulls and directives processed.
    fn fresh(&self, patch: &Value, path: &str) -> Result<Value, StrategicError> {
        match patch {
            Value::Object(patch) => Ok(Value::Object(self.merge_map(Map::new(), patch, path)?)),
            Value::Array(patch) => match self.strategy(path) {
                Some(merge) => Ok(Value::Array(self.merge_list(Vec::new(), patch, merge, path)?)),
                None => {
                    let element_path = elements(path);
                    patch
                        .iter()
                        .map(|element| self.fresh(element, &element_path))
                        .collect::<Result<_, _>>()
                        .map(Value::Array)
                }
            },
            scalar => Ok(scalar.clone()),
        }
    }

    /// Merges a patch list into an original list of a field with merge strategy (upstream's `mergeSlice`).
    fn merge_list(
        &self,
        original: Vec<Value>,
        patch: &[Value],
        merge: ListMerge,
        path: &str,
    ) -> Result<Vec<Value>, StrategicError> {
        match merge {
            ListMerge::Set => merge_set(original, patch, path),
            ListMerge::ByKey(key) => self.merge_keyed(original, patch, key, path),
        }
    }

    /// Merges a list of objects element-wise by `key`, honouring `$patch` elements.
    fn merge_keyed(
        &self,
        mut original: Vec<Value>,
        patch: &[Value],
        key: &'static str,
        path: &str,
    ) -> Result<Vec<Value>, StrategicError> {
        let element_path = elements(path);
        if original.iter().any(|element| !element.is_object()) {
            return Err(StrategicError::NotAnObject { path: element_path });
        }

        let mut replace = false;
        let mut plain: Vec<&Value> = Vec::with_capacity(patch.len());
        for element in patch {
            let Value::Object(map) = element else {
                return Err(StrategicError::NotAnObject { path: element_path });
            };
            let Some(directive) = map.get(PATCH_DIRECTIVE) else {
                plain.push(element);
                continue;
            };
            match directive.as_str() {
                Some("delete") => {
                    let Some(value) = map.get(key) else {
                        return Err(StrategicError::MissingMergeKey {
                            path: element_path,
                            key,
                        });
                    };
                    original.retain(|candidate| !same_identity(candidate.get(key), Some(value)));
                }
                Some("replace") => replace = true,
                Some("merge") => {
                    return Err(invalid(
                        &element_path,
                        PATCH_DIRECTIVE,
                        "merging list elements cannot be requested",
                    ));
                }
                _ => {
                    return Err(invalid(
                        &element_path,
                        PATCH_DIRECTIVE,
                        "must be \"replace\" or \"delete\"",
                    ));
                }
            }
        }
        if replace {
            return plain
                .into_iter()
                .map(|element| self.fresh(element, &element_path))
                .collect();
        }

        let server = original.clone();
        let mut merged = original;
        for element in &plain {
            let Some(map) = element.as_object() else { continue };
            let Some(value) = map.get(key) else {
                return Err(StrategicError::MissingMergeKey {
                    path: element_path,
                    key,
                });
            };
            match merged
                .iter()
                .position(|candidate| same_identity(candidate.get(key), Some(value)))
            {
                Some(index) => {
                    let current = std::mem::take(&mut merged[index]);
                    merged[index] = self.merge_value(current, element, &element_path)?;
                }
                None => merged.push(self.fresh(element, &element_path)?),
            }
        }
        Ok(normalize_order(merged, &plain, &server, ListMerge::ByKey(key)))
    }

    /// Handles `$setElementOrder/<field>`: merges the field's patch list (if any) and orders the result.
    /// Returns whether the field's patch list was consumed; order lists of fields that replace are ignored.
    fn set_element_order(
        &self,
        original: &mut Map<String, Value>,
        patch: &Map<String, Value>,
        field: &str,
        order: &Value,
        path: &str,
    ) -> Result<bool, StrategicError> {
        let directive = || format!("{SET_ELEMENT_ORDER}{field}");
        let Value::Array(order) = order else {
            return Err(invalid(path, &directive(), "must be a list"));
        };
        let field_path = child(path, field);
        let Some(merge) = self.strategy(&field_path) else {
            return Ok(false);
        };
        let patch_list = match patch.get(field) {
            None => None,
            Some(Value::Array(list)) => Some(list.as_slice()),
            Some(_) => return Err(StrategicError::NotAList { path: field_path }),
        };
        let original_list = match original.get(field) {
            None => None,
            Some(Value::Array(list)) => Some(list.clone()),
            Some(_) => return Err(StrategicError::NotAList { path: field_path }),
        };
        if let ListMerge::ByKey(key) = merge
            && !order
                .iter()
                .all(|element| element.as_object().is_some_and(|map| map.contains_key(key)))
        {
            return Err(invalid(
                path,
                &directive(),
                "every element must be an object with the merge key",
            ));
        }
        if let Some(patch_list) = patch_list {
            check_order(patch_list, order, merge, &field_path)?;
        }

        let server = original_list.clone().unwrap_or_default();
        let merged = match (original_list, patch_list) {
            (None, None) => return Ok(true),
            (Some(list), None) => list,
            (list, Some(patch_list)) => self.merge_list(list.unwrap_or_default(), patch_list, merge, &field_path)?,
        };
        let order: Vec<&Value> = order.iter().collect();
        original.insert(
            field.to_owned(),
            Value::Array(normalize_order(merged, &order, &server, merge)),
        );
        Ok(true)
    }
}

/// An [`StrategicError::InvalidDirective`].
fn invalid(path: &str, directive: &str, reason: &'static str) -> StrategicError {
    StrategicError::InvalidDirective {
        path: at(path),
        directive: directive.to_owned(),
        reason,
    }
}

/// Applies `$retainKeys`: checks the patch sets no field outside the list, then drops the original's fields
/// outside it.
fn retain_keys(
    original: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    retain: &Value,
    path: &str,
) -> Result<(), StrategicError> {
    let Value::Array(retain) = retain else {
        return Err(invalid(path, RETAIN_KEYS, "must be a list of field names"));
    };
    let mut keep = HashSet::with_capacity(retain.len());
    for name in retain {
        let Value::String(name) = name else {
            return Err(invalid(path, RETAIN_KEYS, "must be a list of field names"));
        };
        keep.insert(name.as_str());
    }
    for (key, value) in patch {
        let directive = key == PATCH_DIRECTIVE
            || key == RETAIN_KEYS
            || key.starts_with(SET_ELEMENT_ORDER)
            || key.starts_with(DELETE_FROM_PRIMITIVE_LIST);
        if !directive && !value.is_null() && !keep.contains(key.as_str()) {
            return Err(StrategicError::NotInRetainKeys {
                path: at(path),
                field: key.clone(),
            });
        }
    }
    original.retain(|key, _| keep.contains(key.as_str()));
    Ok(())
}

/// Merges a primitive list as an ordered set: the union of both, without duplicates.
fn merge_set(original: Vec<Value>, patch: &[Value], path: &str) -> Result<Vec<Value>, StrategicError> {
    if original
        .iter()
        .chain(patch)
        .any(|value| value.is_object() || value.is_array())
    {
        return Err(StrategicError::NotAScalar { path: elements(path) });
    }
    let mut merged: Vec<Value> = Vec::with_capacity(original.len() + patch.len());
    for value in original.iter().chain(patch) {
        if !merged.iter().any(|seen| same(seen, value)) {
            merged.push(value.clone());
        }
    }
    let preferred: Vec<&Value> = patch.iter().collect();
    Ok(normalize_order(merged, &preferred, &original, ListMerge::Set))
}

/// Checks that the elements a patch list names (apart from `$patch` elements) appear in its
/// `$setElementOrder` list, in the same relative order.
fn check_order(patch_list: &[Value], order: &[Value], merge: ListMerge, path: &str) -> Result<(), StrategicError> {
    let mut remaining = order.iter();
    for element in patch_list {
        if element.as_object().is_some_and(|map| map.contains_key(PATCH_DIRECTIVE)) {
            continue;
        }
        let identity = match merge {
            ListMerge::ByKey(key) => match element.as_object() {
                None => return Err(StrategicError::NotAnObject { path: elements(path) }),
                Some(map) => map.get(key).ok_or_else(|| StrategicError::MissingMergeKey {
                    path: elements(path),
                    key,
                })?,
            },
            ListMerge::Set => element,
        };
        if !remaining.any(|candidate| same_identity(merge.identity(candidate), Some(identity))) {
            return Err(StrategicError::ElementOrderMismatch { path: at(path) });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "podinfo",
                "namespace": "test",
                "labels": {"app": "podinfo", "tier": "backend"},
                "finalizers": ["a.example.com/x", "b.example.com/y"]
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "podinfo"}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                "template": {
                    "metadata": {"labels": {"app": "podinfo"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "podinfod",
                                "image": "x:1",
                                "ports": [
                                    {"containerPort": 9898, "name": "http", "protocol": "TCP"},
                                    {"containerPort": 9797, "name": "metrics", "protocol": "TCP"}
                                ],
                                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
                            },
                            {"name": "sidecar", "image": "proxy:1"}
                        ],
                        "tolerations": [{"key": "k", "operator": "Exists"}]
                    }
                }
            },
            "status": {
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
                ]
            }
        })
    }

    /// `deployment()` with `edit` applied to it.
    fn deployment_with(edit: impl FnOnce(&mut Value)) -> Value {
        let mut object = deployment();
        edit(&mut object);
        object
    }

    fn pod_spec(object: &mut Value) -> &mut Value {
        &mut object["spec"]["template"]["spec"]
    }

    #[test]
    fn set_image_patch_merges_into_the_named_container_and_keeps_everything_else() {
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "podinfod", "image": "x:2"}]}}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| pod_spec(d)["containers"][0]["image"] = json!("x:2"));
        assert_eq!(result, expected);
    }

    #[test]
    fn env_merges_by_name_and_patch_delete_removes_one_variable() {
        let patch = json!({"spec": {"template": {"spec": {"containers": [{
            "name": "podinfod",
            "env": [{"name": "B", "value": "20"}, {"name": "A", "$patch": "delete"}, {"name": "C", "value": "3"}]
        }]}}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| {
            pod_spec(d)["containers"][0]["env"] = json!([{"name": "B", "value": "20"}, {"name": "C", "value": "3"}]);
        });
        assert_eq!(result, expected);
    }

    #[test]
    fn a_new_list_element_precedes_the_untouched_ones_like_upstream() {
        let container = json!({"name": "podinfod", "env": [{"name": "C", "value": "3"}]});
        let patch = json!({"spec": {"template": {"spec": {"containers": [container]}}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| {
            pod_spec(d)["containers"][0]["env"] =
                json!([{"name": "C", "value": "3"}, {"name": "A", "value": "1"}, {"name": "B", "value": "2"}]);
        });
        assert_eq!(result, expected);
    }

    #[test]
    fn null_deletes_a_label() {
        let patch = json!({"metadata": {"labels": {"tier": null, "team": "a"}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| d["metadata"]["labels"] = json!({"app": "podinfo", "team": "a"}));
        assert_eq!(result, expected);
    }

    #[test]
    fn set_element_order_reorders_containers_without_a_patch_list() {
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "podinfod"}]
        }}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| {
            let containers = pod_spec(d)["containers"].as_array_mut().unwrap();
            containers.reverse();
        });
        assert_eq!(result, expected);
    }

    #[test]
    fn set_element_order_places_a_new_container_where_the_order_says() {
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "podinfod"}, {"name": "sidecar"}, {"name": "debug"}],
            "containers": [{"name": "debug", "image": "busybox"}]
        }}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| {
            let containers = pod_spec(d)["containers"].as_array_mut().unwrap();
            containers.push(json!({"name": "debug", "image": "busybox"}));
        });
        assert_eq!(result, expected);
    }

    #[test]
    fn retain_keys_drops_rolling_update_when_switching_to_recreate() {
        let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate", "rollingUpdate": null}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| d["spec"]["strategy"] = json!({"type": "Recreate"}));
        assert_eq!(result, expected);
    }

    #[test]
    fn retain_keys_refuses_a_patch_setting_a_field_it_drops() {
        let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate", "rollingUpdate": {}}}});
        let error = apply("Deployment", &deployment(), &patch).unwrap_err();
        assert!(
            matches!(
                &error,
                StrategicError::NotInRetainKeys { path, field } if path == "spec.strategy" && field == "rollingUpdate"
            ),
            "{error:?}"
        );
    }

    #[test]
    fn kubectl_apply_patch_changes_the_image_and_removes_a_container_port() {
        let last_applied = r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"podinfo"}}"#;
        let patch = json!({
            "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": last_applied}},
            "spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "podinfod"}, {"name": "sidecar"}],
                "containers": [{
                    "$setElementOrder/ports": [{"containerPort": 9898}],
                    "image": "x:2",
                    "name": "podinfod",
                    "ports": [{"$patch": "delete", "containerPort": 9797}]
                }]
            }}}
        });
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| {
            d["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/last-applied-configuration": last_applied});
            let container = &mut pod_spec(d)["containers"][0];
            container["image"] = json!("x:2");
            container["ports"] = json!([{"containerPort": 9898, "name": "http", "protocol": "TCP"}]);
        });
        assert_eq!(result, expected);
    }

    #[test]
    fn patch_replace_as_a_list_element_replaces_the_whole_list() {
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"$patch": "replace"},
            {"name": "only", "image": "only:1"}
        ]}}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| pod_spec(d)["containers"] = json!([{"name": "only", "image": "only:1"}]));
        assert_eq!(result, expected);
    }

    #[test]
    fn patch_replace_in_a_map_replaces_the_map() {
        let patch = json!({"metadata": {"labels": {"$patch": "replace", "only": "this"}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| d["metadata"]["labels"] = json!({"only": "this"}));
        assert_eq!(result, expected);
    }

    #[test]
    fn patch_delete_in_a_map_leaves_it_empty_like_upstream() {
        let patch = json!({"spec": {"strategy": {"$patch": "delete"}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| d["spec"]["strategy"] = json!({}));
        assert_eq!(result, expected);
    }

    #[test]
    fn lists_without_a_merge_key_are_replaced() {
        let patch = json!({"spec": {"template": {"spec": {"tolerations": [{"key": "other", "operator": "Exists"}]}}}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected =
            deployment_with(|d| pod_spec(d)["tolerations"] = json!([{"key": "other", "operator": "Exists"}]));
        assert_eq!(result, expected);
    }

    #[test]
    fn finalizers_merge_as_a_set_and_delete_from_primitive_list_removes_values() {
        let patch = json!({"metadata": {
            "finalizers": ["b.example.com/y", "c.example.com/z"],
            "$deleteFromPrimitiveList/finalizers": ["a.example.com/x"]
        }});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| d["metadata"]["finalizers"] = json!(["b.example.com/y", "c.example.com/z"]));
        assert_eq!(result, expected);
    }

    #[test]
    fn delete_from_primitive_list_alone_removes_a_finalizer() {
        let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b.example.com/y"]}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| d["metadata"]["finalizers"] = json!(["a.example.com/x"]));
        assert_eq!(result, expected);
    }

    #[test]
    fn set_element_order_orders_a_primitive_list() {
        let patch = json!({"metadata": {
            "$setElementOrder/finalizers": ["b.example.com/y", "c.example.com/z", "a.example.com/x"],
            "finalizers": ["c.example.com/z"]
        }});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| {
            d["metadata"]["finalizers"] = json!(["b.example.com/y", "c.example.com/z", "a.example.com/x"]);
        });
        assert_eq!(result, expected);
    }

    #[test]
    fn set_element_order_refuses_a_patch_list_in_another_order() {
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "podinfod"}, {"name": "sidecar"}],
            "containers": [{"name": "sidecar", "image": "proxy:2"}, {"name": "podinfod", "image": "x:2"}]
        }}}});
        let error = apply("Deployment", &deployment(), &patch).unwrap_err();
        assert!(
            matches!(&error, StrategicError::ElementOrderMismatch { path } if path == "spec.template.spec.containers"),
            "{error:?}"
        );
    }

    #[test]
    fn service_ports_merge_by_port() {
        let service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "podinfo"},
            "spec": {
                "type": "ClusterIP",
                "selector": {"app": "podinfo"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 9898, "protocol": "TCP"},
                    {"name": "grpc", "port": 9999, "targetPort": 9999, "protocol": "TCP"}
                ]
            }
        });
        let patch = json!({"spec": {"ports": [{"port": 80, "targetPort": "http"}]}});
        let result = apply("Service", &service, &patch).unwrap();
        let mut expected = service.clone();
        expected["spec"]["ports"][0]["targetPort"] = json!("http");
        assert_eq!(result, expected);
    }

    #[test]
    fn status_conditions_merge_by_type() {
        let patch = json!({"status": {"conditions": [
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"},
            {"type": "ReplicaFailure", "status": "True"}
        ]}});
        let result = apply("Deployment", &deployment(), &patch).unwrap();
        let expected = deployment_with(|d| {
            d["status"]["conditions"] = json!([
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"},
                {"type": "ReplicaFailure", "status": "True"}
            ]);
        });
        assert_eq!(result, expected);
    }

    #[test]
    fn pod_status_conditions_merge_by_type() {
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}
        });
        let patch = json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
        let result = apply("Pod", &pod, &patch).unwrap();
        let mut expected = pod.clone();
        expected["status"] = json!({
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}]
        });
        assert_eq!(result, expected);
    }

    #[test]
    fn directives_inside_a_new_field_do_not_reach_the_result() {
        let configmap = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        let patch = json!({"data": {"$patch": "merge", "a": "1", "b": null}});
        let result = apply("ConfigMap", &configmap, &patch).unwrap();
        assert_eq!(
            result,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}})
        );
    }

    #[test]
    fn a_custom_resource_kind_is_unsupported() {
        let object = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}});
        let error = apply("Widget", &object, &json!({"spec": {"size": 2}})).unwrap_err();
        assert!(
            matches!(&error, StrategicError::UnsupportedKind { kind } if kind == "Widget"),
            "{error:?}"
        );
    }

    #[test]
    fn a_patch_that_is_not_an_object_is_refused() {
        let error = apply("Deployment", &deployment(), &json!([{"op": "replace"}])).unwrap_err();
        assert!(
            matches!(&error, StrategicError::NotAnObject { path } if path == "<root>"),
            "{error:?}"
        );
    }

    #[test]
    fn a_keyed_list_element_without_its_merge_key_is_refused() {
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"image": "x:2"}]}}}});
        let error = apply("Deployment", &deployment(), &patch).unwrap_err();
        assert!(
            matches!(
                &error,
                StrategicError::MissingMergeKey { path, key: "name" } if path == "spec.template.spec.containers[]"
            ),
            "{error:?}"
        );
    }

    #[test]
    fn an_invalid_patch_directive_is_refused() {
        let patch = json!({"metadata": {"labels": {"$patch": "explode"}}});
        let error = apply("Deployment", &deployment(), &patch).unwrap_err();
        assert!(
            matches!(&error, StrategicError::InvalidDirective { path, .. } if path == "metadata.labels"),
            "{error:?}"
        );
    }

    #[test]
    fn merge_key_lookup_covers_pod_specs_wherever_they_appear() {
        assert_eq!(
            merge_key("Deployment", &["spec", "template", "spec", "containers"]),
            Some("name")
        );
        assert_eq!(merge_key("Pod", &["spec", "containers", "[]", "env"]), Some("name"));
        assert_eq!(
            merge_key(
                "CronJob",
                &["spec", "jobTemplate", "spec", "template", "spec", "volumes"]
            ),
            Some("name")
        );
        assert_eq!(
            merge_key(
                "StatefulSet",
                &["spec", "template", "spec", "initContainers[]", "ports"]
            ),
            Some("containerPort")
        );
        assert_eq!(merge_key("Service", &["spec", "ports"]), Some("port"));
        assert_eq!(merge_key("Secret", &["metadata", "ownerReferences"]), Some("uid"));
        assert_eq!(list_merge("Lease", &["metadata", "finalizers"]), Some(ListMerge::Set));
        assert_eq!(merge_key("Pod", &["spec", "tolerations"]), None);
        assert_eq!(merge_key("ConfigMap", &["spec", "ports"]), None);
    }
}
