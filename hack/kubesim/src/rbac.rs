//! RBAC authorization: Roles, ClusterRoles and their bindings from the store, evaluated as the
//! apiserver's RBAC authorizer does for resource requests. `system:masters` may do anything.

use std::sync::Arc;

use serde_json::Value;

use crate::api::{Authorizer, User};
use crate::resources::ResourceType;
use crate::store::Store;

/// The RBAC authorizer.
pub struct Rbac {
    store: Arc<Store>,
}

impl Rbac {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    fn list(&self, plural: &str, namespace: Option<&str>) -> Vec<Arc<Value>> {
        self.store
            .list(&("rbac.authorization.k8s.io".into(), plural.into()), namespace)
            .0
    }

    fn role(&self, kind: &str, name: &str, namespace: &str) -> Option<Arc<Value>> {
        let (plural, ns) = if kind == "ClusterRole" {
            ("clusterroles", "")
        } else {
            ("roles", namespace)
        };
        self.store
            .get(&("rbac.authorization.k8s.io".into(), plural.into()), ns, name)
    }
}

fn binds(binding: &Value, user: &User) -> bool {
    binding["subjects"].as_array().into_iter().flatten().any(|s| {
        let name = s["name"].as_str().unwrap_or_default();
        match s["kind"].as_str() {
            Some("User") => name == user.name,
            Some("Group") => user.groups.iter().any(|g| g == name),
            Some("ServiceAccount") => {
                let ns = s["namespace"].as_str().unwrap_or_default();
                user.name == format!("system:serviceaccount:{ns}:{name}")
            }
            _ => false,
        }
    })
}

fn has(list: &Value, value: &str) -> bool {
    list.as_array()
        .is_some_and(|a| a.iter().any(|v| v == "*" || v == value))
}

fn allows(role: &Value, verb: &str, t: &ResourceType, subresource: Option<&str>, name: &str) -> bool {
    let resource = match subresource {
        Some(sub) => format!("{}/{sub}", t.plural),
        None => t.plural.clone(),
    };
    role["rules"].as_array().into_iter().flatten().any(|rule| {
        let names_ok = rule["resourceNames"]
            .as_array()
            .is_none_or(|n| n.is_empty() || n.iter().any(|x| x == name));
        has(&rule["verbs"], verb) && has(&rule["apiGroups"], &t.group) && has(&rule["resources"], &resource) && names_ok
    })
}

impl Authorizer for Rbac {
    fn authorize(
        &self,
        user: &User,
        verb: &str,
        t: &ResourceType,
        subresource: Option<&str>,
        namespace: &str,
        name: &str,
    ) -> Result<(), String> {
        if user.groups.iter().any(|g| g == "system:masters") {
            return Ok(());
        }
        for b in self.list("clusterrolebindings", None) {
            if binds(&b, user)
                && let Some(role) = self.role("ClusterRole", b["roleRef"]["name"].as_str().unwrap_or_default(), "")
                && allows(&role, verb, t, subresource, name)
            {
                return Ok(());
            }
        }
        if t.namespaced && !namespace.is_empty() {
            for b in self.list("rolebindings", Some(namespace)) {
                let kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
                if binds(&b, user)
                    && let Some(role) = self.role(kind, b["roleRef"]["name"].as_str().unwrap_or_default(), namespace)
                    && allows(&role, verb, t, subresource, name)
                {
                    return Ok(());
                }
            }
        }
        let resource = match subresource {
            Some(sub) => format!("{}/{sub}", t.plural),
            None => t.plural.clone(),
        };
        let group = if t.group.is_empty() {
            "\"\"".to_owned()
        } else {
            format!("\"{}\"", t.group)
        };
        let what = if name.is_empty() {
            String::new()
        } else {
            format!(" \"{name}\"")
        };
        let scope = if t.namespaced && !namespace.is_empty() {
            format!("in the namespace \"{namespace}\"")
        } else {
            "at the cluster scope".to_owned()
        };
        Err(format!(
            "{}{what} is forbidden: User \"{}\" cannot {verb} resource \"{resource}\" in API group {group} {scope}",
            t.group_resource(),
            user.name
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(name: &str) -> User {
        User {
            name: name.into(),
            groups: vec!["system:authenticated".into()],
        }
    }

    fn deployments() -> ResourceType {
        crate::resources::builtins()
            .into_iter()
            .find(|t| t.plural == "deployments")
            .unwrap()
    }

    fn store_with(objects: &[(&str, Value)]) -> Arc<Store> {
        let store = Arc::new(Store::new(100));
        for (plural, o) in objects {
            store
                .create(&("rbac.authorization.k8s.io".into(), (*plural).into()), o.clone())
                .unwrap();
        }
        store
    }

    #[test]
    fn a_cluster_role_bound_to_a_service_account_allows_exactly_its_verbs() {
        let store = store_with(&[
            (
                "clusterroles",
                json!({"metadata": {"name": "r"}, "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]}]}),
            ),
            (
                "clusterrolebindings",
                json!({"metadata": {"name": "b"}, "roleRef": {"kind": "ClusterRole", "name": "r"},
                "subjects": [{"kind": "ServiceAccount", "name": "turnout", "namespace": "turnout-system"}]}),
            ),
        ]);
        let rbac = Rbac::new(store);
        let sa = user("system:serviceaccount:turnout-system:turnout");
        assert!(
            rbac.authorize(&sa, "patch", &deployments(), None, "test", "podinfo")
                .is_ok()
        );
        let err = rbac
            .authorize(&sa, "delete", &deployments(), None, "test", "podinfo")
            .unwrap_err();
        assert_eq!(
            err,
            "deployments.apps \"podinfo\" is forbidden: User \"system:serviceaccount:turnout-system:turnout\" cannot delete resource \"deployments\" in API group \"apps\" in the namespace \"test\""
        );
        assert!(
            rbac.authorize(&sa, "update", &deployments(), Some("status"), "test", "podinfo")
                .is_err(),
            "subresources are separate"
        );
        assert!(
            rbac.authorize(&user("mallory"), "get", &deployments(), None, "test", "podinfo")
                .is_err()
        );
    }

    #[test]
    fn a_role_binding_grants_only_in_its_namespace() {
        let store = store_with(&[
            (
                "roles",
                json!({"metadata": {"name": "r", "namespace": "a"}, "rules": [{"apiGroups": ["apps"], "resources": ["*"], "verbs": ["*"]}]}),
            ),
            (
                "rolebindings",
                json!({"metadata": {"name": "b", "namespace": "a"}, "roleRef": {"kind": "Role", "name": "r"},
                "subjects": [{"kind": "User", "name": "alice"}]}),
            ),
        ]);
        let rbac = Rbac::new(store);
        assert!(
            rbac.authorize(&user("alice"), "create", &deployments(), None, "a", "")
                .is_ok()
        );
        assert!(
            rbac.authorize(&user("alice"), "create", &deployments(), None, "b", "")
                .is_err()
        );
    }
}
