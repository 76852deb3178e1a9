//! Garbage collection by ownerReferences: dependents of a deleted owner are deleted (background), or
//! released (orphan), and an owner deleted in the foreground goes once its dependents are gone.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::Ctx;
use crate::resources::ResourceType;
use crate::store::ResourceKey;

/// Deletes dependents whose owners are all gone, and finishes foreground and orphan deletions; whether
/// work is left waiting on deletions to come (a foreground deletion's dependents, a namespace's objects).
///
/// An owner's dependents come from the store's owner index, so a sweep stays linear in the number of
/// objects.
pub(super) fn sweep(ctx: &Ctx) -> bool {
    let mut waiting = false;
    let api = &ctx.api;
    let registry = api.registry();
    let mut uids = std::collections::HashSet::new();
    let mut types: HashMap<ResourceKey, Arc<ResourceType>> = HashMap::new();
    let mut all: Vec<(Arc<ResourceType>, Arc<Value>)> = Vec::new();
    for t in registry.all() {
        // One version per resource is enough: versions share their objects.
        let key = crate::api::key(t);
        if types.contains_key(&key) {
            continue;
        }
        let (items, _) = api.store.list(&key, None);
        types.insert(key, t.clone());
        for o in items {
            if let Some(uid) = o["metadata"]["uid"].as_str() {
                uids.insert(uid.to_owned());
            }
            all.push((t.clone(), o));
        }
    }
    let no_query = Default::default();
    for (t, o) in &all {
        let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        if let Some(refs) = o["metadata"]["ownerReferences"].as_array()
            && !refs.is_empty()
            && refs.iter().all(|r| r["uid"].as_str().is_none_or(|u| !uids.contains(u)))
        {
            let _ = api.delete(
                t,
                ns,
                name,
                &json!({"propagationPolicy": "Background"}),
                &no_query,
                false,
            );
            continue;
        }
        let finalizers: Vec<&str> = o["metadata"]["finalizers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let Some(uid) = o["metadata"]["uid"].as_str() else {
            continue;
        };
        let dependents = || -> Vec<(Arc<ResourceType>, Arc<Value>)> {
            api.store
                .dependents(uid)
                .into_iter()
                .filter_map(|(key, d)| Some((types.get(&key)?.clone(), d)))
                .collect()
        };
        if finalizers.contains(&"foregroundDeletion") {
            let dependents = dependents();
            for (dt, d) in &dependents {
                let dns = d["metadata"]["namespace"].as_str().unwrap_or_default();
                let dname = d["metadata"]["name"].as_str().unwrap_or_default();
                let _ = api.delete(
                    dt,
                    dns,
                    dname,
                    &json!({"propagationPolicy": "Foreground"}),
                    &no_query,
                    false,
                );
            }
            if dependents.is_empty() {
                release(ctx, t, o, "foregroundDeletion");
            } else {
                waiting = true;
            }
        } else if finalizers.contains(&"orphan") {
            for (dt, d) in &dependents() {
                let mut next = (**d).clone();
                let kept: Vec<Value> = next["metadata"]["ownerReferences"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| r["uid"] != uid)
                    .collect();
                next["metadata"]["ownerReferences"] = json!(kept);
                let _ = api.store.update(&crate::api::key(dt), next, None);
            }
            release(ctx, t, o, "orphan");
        } else if t.group.is_empty() && t.plural == "namespaces" && o["metadata"].get("deletionTimestamp").is_some() {
            // The namespace controller: delete everything in it, then the namespace.
            let mut empty = true;
            for (dt, d) in all
                .iter()
                .filter(|(_, d)| d["metadata"]["namespace"].as_str() == Some(name))
            {
                empty = false;
                let dname = d["metadata"]["name"].as_str().unwrap_or_default();
                let _ = api.delete(dt, name, dname, &json!({"gracePeriodSeconds": 0}), &no_query, false);
            }
            if empty {
                let _ = api.store.delete(&crate::api::key(t), "", name, None);
            } else {
                waiting = true;
            }
        }
    }
    waiting
}

fn release(ctx: &Ctx, t: &crate::resources::ResourceType, o: &Value, finalizer: &str) {
    let mut next = o.clone();
    let kept: Vec<Value> = next["metadata"]["finalizers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f != finalizer)
        .collect();
    next["metadata"]["finalizers"] = json!(kept);
    let key = crate::api::key(t);
    if kept.is_empty() && o["metadata"].get("deletionTimestamp").is_some() {
        let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        let _ = ctx.api.store.delete(&key, ns, name, None);
    } else {
        let _ = ctx.api.store.update(&key, next, None);
    }
}
