//! The resource types kubesim serves: the built-in ones turnout and kubectl use, and every custom
//! resource whose CRD has been created.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::schema::Schema;

/// One resource type at one group/version.
#[derive(Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    /// Lower-case plural, as in URLs: `deployments`.
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Whether `/status` is served (and writes to the main resource leave `status` alone).
    pub status: bool,
    /// Whether `/scale` is served (Deployments, ReplicaSets).
    pub scale: bool,
    /// Custom resources: the schema objects are checked against, and the printer columns.
    pub crd: Option<CustomInfo>,
}

/// What a CRD adds to a resource type.
#[derive(Clone)]
pub struct CustomInfo {
    pub schema: Option<Arc<Schema>>,
    /// `additionalPrinterColumns` of the served version.
    pub printer_columns: Vec<Value>,
}

impl std::fmt::Debug for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.gvr())
    }
}

impl ResourceType {
    fn builtin(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: Vec::new(),
            categories: Vec::new(),
            status: false,
            scale: false,
            crd: None,
        }
    }

    fn short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    fn with_status(mut self) -> Self {
        self.status = true;
        self
    }

    fn with_scale(mut self) -> Self {
        self.scale = true;
        self
    }

    fn all(mut self) -> Self {
        self.categories = vec!["all".into()];
        self
    }

    /// `apps/v1` or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.v1.apps`, for messages.
    pub fn gvr(&self) -> String {
        if self.group.is_empty() {
            format!("{}.{}", self.plural, self.version)
        } else {
            format!("{}.{}.{}", self.plural, self.version, self.group)
        }
    }

    /// `deployments.apps`, as the apiserver names a resource in error messages.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether strategic merge patch applies (built-in types only, as upstream).
    pub fn strategic_merge(&self) -> bool {
        self.crd.is_none()
    }

    /// The `APIResource` entries of this type for discovery (the resource and its subresources).
    pub fn discovery(&self) -> Vec<Value> {
        let verbs = [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
            "shortNames": self.short_names,
            "categories": self.categories,
        })];
        if self.status {
            out.push(
                json!({"name": format!("{}/status", self.plural), "singularName": "", "namespaced": self.namespaced,
                "kind": self.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
        if self.scale {
            out.push(
                json!({"name": format!("{}/scale", self.plural), "singularName": "", "namespaced": self.namespaced,
                "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}),
            );
        }
        out
    }
}

/// The built-in resource types.
pub fn builtins() -> Vec<ResourceType> {
    use ResourceType as R;
    vec![
        R::builtin("", "v1", "Namespace", "namespaces", false)
            .short(&["ns"])
            .with_status(),
        R::builtin("", "v1", "Pod", "pods", true)
            .short(&["po"])
            .with_status()
            .all(),
        R::builtin("", "v1", "Service", "services", true)
            .short(&["svc"])
            .with_status()
            .all(),
        R::builtin("", "v1", "Endpoints", "endpoints", true).short(&["ep"]),
        R::builtin("", "v1", "Event", "events", true).short(&["ev"]),
        R::builtin("", "v1", "ServiceAccount", "serviceaccounts", true).short(&["sa"]),
        R::builtin("", "v1", "ConfigMap", "configmaps", true).short(&["cm"]),
        R::builtin("", "v1", "Secret", "secrets", true),
        R::builtin("apps", "v1", "Deployment", "deployments", true)
            .short(&["deploy"])
            .with_status()
            .with_scale()
            .all(),
        R::builtin("apps", "v1", "ReplicaSet", "replicasets", true)
            .short(&["rs"])
            .with_status()
            .with_scale()
            .all(),
        R::builtin("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true),
        R::builtin("events.k8s.io", "v1", "Event", "events", true).short(&["ev"]),
        R::builtin("coordination.k8s.io", "v1", "Lease", "leases", true),
        R::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        )
        .short(&["crd", "crds"])
        .with_status(),
        R::builtin(
            "admissionregistration.k8s.io",
            "v1",
            "MutatingWebhookConfiguration",
            "mutatingwebhookconfigurations",
            false,
        ),
        R::builtin(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingWebhookConfiguration",
            "validatingwebhookconfigurations",
            false,
        ),
        R::builtin("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
        R::builtin("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", true),
        R::builtin("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", false),
        R::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        ),
        R::builtin("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", true)
            .short(&["pdb"])
            .with_status(),
        R::builtin(
            "autoscaling",
            "v2",
            "HorizontalPodAutoscaler",
            "horizontalpodautoscalers",
            true,
        )
        .short(&["hpa"])
        .with_status()
        .all(),
    ]
}

/// Why a CRD could not be served.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("spec.{field} is missing")]
    Missing { field: &'static str },
    #[error("spec.versions has no served storage version")]
    NoStorageVersion,
    #[error("the schema of version {version} cannot be used")]
    Schema {
        version: String,
        #[source]
        source: crate::schema::SchemaError,
    },
}

/// The resource types a CRD object defines: one per served version.
///
/// # Errors
///
/// The CRD lacks names, versions, or has a schema kubesim cannot compile.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, CrdError> {
    let spec = &crd["spec"];
    let s = |v: &Value| v.as_str().map(str::to_owned);
    let group = s(&spec["group"]).ok_or(CrdError::Missing { field: "group" })?;
    let names = &spec["names"];
    let kind = s(&names["kind"]).ok_or(CrdError::Missing { field: "names.kind" })?;
    let plural = s(&names["plural"]).ok_or(CrdError::Missing { field: "names.plural" })?;
    let singular = s(&names["singular"]).unwrap_or_else(|| kind.to_lowercase());
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    let versions = spec["versions"]
        .as_array()
        .ok_or(CrdError::Missing { field: "versions" })?;
    if !versions.iter().any(|v| v["storage"] == true) {
        return Err(CrdError::NoStorageVersion);
    }
    let mut out = Vec::new();
    for v in versions.iter().filter(|v| v["served"] != false) {
        let version = s(&v["name"]).ok_or(CrdError::Missing {
            field: "versions[].name",
        })?;
        let schema = match v.pointer("/schema/openAPIV3Schema") {
            Some(raw) => Some(Arc::new(Schema::new(raw).map_err(|source| CrdError::Schema {
                version: version.clone(),
                source,
            })?)),
            None => None,
        };
        out.push(ResourceType {
            group: group.clone(),
            version,
            kind: kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            namespaced,
            short_names: list(&names["shortNames"]),
            categories: list(&names["categories"]),
            status: v.pointer("/subresources/status").is_some(),
            scale: false,
            crd: Some(CustomInfo {
                schema,
                printer_columns: v["additionalPrinterColumns"].as_array().cloned().unwrap_or_default(),
            }),
        });
    }
    Ok(out)
}

/// Every served resource type, looked up by URL parts.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    /// (group, version, plural) → type
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
}

impl Registry {
    /// The built-in types.
    pub fn new() -> Self {
        let mut r = Self::default();
        for t in builtins() {
            r.insert(t);
        }
        r
    }

    pub fn insert(&mut self, t: ResourceType) {
        self.types
            .insert((t.group.clone(), t.version.clone(), t.plural.clone()), Arc::new(t));
    }

    /// Removes the custom types of `group`/`plural` (a deleted CRD).
    pub fn remove_custom(&mut self, group: &str, plural: &str) {
        self.types
            .retain(|(g, _, p), t| !(g == group && p == plural && t.crd.is_some()));
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_owned(), version.to_owned(), plural.to_owned()))
            .cloned()
    }

    /// The type of `apiVersion`/`kind` (for objects in request bodies and ownerReferences).
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceType>> {
        self.types
            .values()
            .find(|t| t.kind == kind && t.api_version() == api_version)
            .cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// The groups with their versions, core group excluded, in a stable order.
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (g, v, _) in self.types.keys() {
            if g.is_empty() {
                continue;
            }
            let versions = out.entry(g.clone()).or_default();
            if !versions.contains(v) {
                versions.push(v.clone());
            }
        }
        out
    }
}
