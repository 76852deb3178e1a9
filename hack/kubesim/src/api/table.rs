//! Server-side printing: the `meta.k8s.io/v1` Table `kubectl get` asks for, with the columns kubectl
//! users know for the kinds turnout deals with, and a CRD's printer columns for custom resources.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::resources::ResourceType;

/// Column definitions (name, type) and the function computing a row's cells.
type Printer = (Vec<(&'static str, &'static str)>, fn(&Value) -> Vec<Value>);

/// A Table of `items` (all of type `t`).
pub fn table(t: &ResourceType, items: &[Value], rv: u64, query: &HashMap<String, String>) -> Value {
    let include = query.get("includeObject").map_or("Metadata", String::as_str);
    let (columns, cells): Printer = match (t.group.as_str(), t.plural.as_str()) {
        ("apps", "deployments") => (
            vec![
                ("Name", "string"),
                ("Ready", "string"),
                ("Up-to-date", "string"),
                ("Available", "string"),
                ("Age", "string"),
            ],
            |o| {
                let s = &o["status"];
                vec![
                    name(o),
                    json!(format!("{}/{}", int(&s["readyReplicas"]), int(&o["spec"]["replicas"]))),
                    json!(int(&s["updatedReplicas"])),
                    json!(int(&s["availableReplicas"])),
                    age(o),
                ]
            },
        ),
        ("apps", "replicasets") => (
            vec![
                ("Name", "string"),
                ("Desired", "integer"),
                ("Current", "integer"),
                ("Ready", "integer"),
                ("Age", "string"),
            ],
            |o| {
                let s = &o["status"];
                vec![
                    name(o),
                    json!(int(&o["spec"]["replicas"])),
                    json!(int(&s["replicas"])),
                    json!(int(&s["readyReplicas"])),
                    age(o),
                ]
            },
        ),
        ("", "pods") => (
            vec![
                ("Name", "string"),
                ("Ready", "string"),
                ("Status", "string"),
                ("Restarts", "string"),
                ("Age", "string"),
            ],
            |o| {
                let statuses = o["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
                let ready = statuses.iter().filter(|c| c["ready"] == true).count();
                let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                let restarts: i64 = statuses.iter().map(|c| c["restartCount"].as_i64().unwrap_or(0)).sum();
                let phase = if o["metadata"].get("deletionTimestamp").is_some() {
                    "Terminating".to_owned()
                } else {
                    o["status"]["phase"].as_str().unwrap_or("Pending").to_owned()
                };
                vec![
                    name(o),
                    json!(format!("{ready}/{total}")),
                    json!(phase),
                    json!(restarts.to_string()),
                    age(o),
                ]
            },
        ),
        ("", "services") => (
            vec![
                ("Name", "string"),
                ("Type", "string"),
                ("Cluster-IP", "string"),
                ("Port(s)", "string"),
                ("Age", "string"),
            ],
            |o| {
                let ports: Vec<String> = o["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}/{}", int(&p["port"]), p["protocol"].as_str().unwrap_or("TCP")))
                    .collect();
                vec![
                    name(o),
                    o["spec"]["type"].clone(),
                    json!(o["spec"]["clusterIP"].as_str().unwrap_or("<none>")),
                    json!(ports.join(",")),
                    age(o),
                ]
            },
        ),
        ("", "namespaces") => (vec![("Name", "string"), ("Status", "string"), ("Age", "string")], |o| {
            vec![
                name(o),
                json!(o["status"]["phase"].as_str().unwrap_or("Active")),
                age(o),
            ]
        }),
        _ => (vec![("Name", "string"), ("Age", "string")], |o| vec![name(o), age(o)]),
    };
    let mut definitions: Vec<Value> =
        columns.iter().map(|(n, ty)| json!({"name": n, "type": ty, "format": if *n == "Name" { "name" } else { "" }, "description": "", "priority": 0})).collect();
    let printer = t.crd.as_ref().map(|c| c.printer_columns.clone()).unwrap_or_default();
    if !printer.is_empty() {
        definitions =
            vec![json!({"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0})];
        for c in &printer {
            definitions.push(json!({"name": c["name"], "type": c["type"], "format": c["format"].as_str().unwrap_or(""),
                "description": c["description"].as_str().unwrap_or(""), "priority": c["priority"].as_i64().unwrap_or(0)}));
        }
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let cells = if printer.is_empty() {
                cells(o)
            } else {
                std::iter::once(name(o))
                    .chain(
                        printer
                            .iter()
                            .map(|c| json_path(o, c["jsonPath"].as_str().unwrap_or_default())),
                    )
                    .collect()
            };
            let object = match include {
                "Object" => o.clone(),
                "None" => Value::Null,
                _ => {
                    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
                }
            };
            json!({"cells": cells, "object": object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

fn name(o: &Value) -> Value {
    o["metadata"]["name"].clone()
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// `kubectl`'s age format: 5s, 3m, 2h, 4d.
fn age(o: &Value) -> Value {
    let created = o["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok());
    let Some(created) = created else {
        return json!("<unknown>");
    };
    let secs = (time::OffsetDateTime::now_utc() - created).whole_seconds().max(0);
    json!(match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    })
}

/// The value at a simple JSONPath (`.spec.hosts`, `.status.conditions[0].type`), as printer columns use.
fn json_path(o: &Value, path: &str) -> Value {
    let mut cur = o;
    for part in path.trim_start_matches('.').split('.').filter(|p| !p.is_empty()) {
        let (field, index) = match part.split_once('[') {
            Some((f, rest)) => (f, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        cur = &cur[field];
        if let Some(i) = index {
            cur = &cur[i];
        }
    }
    cur.clone()
}
