//! The README documents what the code has: every release annotation, every flag of `turnout run`,
//! every metric and every Event reason. A new one without documentation fails here.

// A test stops at the first thing that is not as it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use prometheus_client::registry::Registry;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

#[test]
fn every_release_annotation_is_in_the_configuration_table() {
    let readme = readme();
    for key in turnout::config::keys::ALL {
        assert!(
            readme.contains(&format!("| `{key}` |")),
            "README's configuration table lacks {key}"
        );
    }
}

#[test]
fn every_flag_of_turnout_run_is_documented() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let flags: BTreeSet<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !["--help", "--version"].contains(w))
        .collect();
    assert!(flags.len() > 15, "read the flags from --help: {flags:?}");
    let readme = readme();
    let missing: Vec<&&str> = flags.iter().filter(|f| !readme.contains(&format!("`{f}`"))).collect();
    assert!(missing.is_empty(), "flags missing from the README: {missing:?}");
}

#[test]
fn every_subcommand_is_documented() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_turnout"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // Wrapped descriptions are indented further.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 11, "read the subcommands from --help: {commands:?}");
    let readme = readme();
    let missing: Vec<&&str> = commands
        .iter()
        .filter(|c| !readme.contains(&format!("`turnout {c}")))
        .collect();
    assert!(missing.is_empty(), "subcommands missing from the README: {missing:?}");
}

/// Metric names as registered (families without samples are not encoded, so the source is read).
fn registered_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["src/metrics.rs", "src/agent/mod.rs"] {
        let source = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mut rest = source.as_str();
        while let Some(at) = rest.find("registry.register(") {
            rest = &rest[at..];
            let start = rest.find('"').unwrap() + 1;
            let end = start + rest[start..].find('"').unwrap();
            names.insert(rest[start..end].to_owned());
            rest = &rest[end..];
        }
    }
    names
}

#[test]
fn every_metric_is_documented() {
    let names = registered_metrics();
    assert!(names.len() >= 10, "{names:?}");
    // The registered names are the real ones: a registry with them all encodes them.
    let mut registry = Registry::default();
    turnout::metrics::WebhookMetrics::register(&mut registry);
    turnout::agent::AgentMetrics::register(&mut registry);
    let text = turnout::metrics::encode(&registry);
    for name in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
    {
        assert!(names.contains(name), "{name} was not found in the source");
    }
    let readme = readme();
    for name in &names {
        // Counters are exposed with a _total suffix.
        let documented = [format!("`{name}`"), format!("`{name}{{"), format!("`{name}_total")]
            .iter()
            .any(|form| readme.contains(form.as_str()));
        assert!(documented, "README's metrics section lacks {name}");
    }
}

#[test]
fn every_event_reason_is_documented_and_written_from_its_constant() {
    let readme = readme();
    for reason in turnout::release::reasons::ALL {
        assert!(
            readme.contains(&format!("| `{reason}` |")),
            "README's Events table lacks {reason}"
        );
    }
    // A reason written as a literal would escape the list (and the notifications that match on it).
    // Where a reason is written: `reason: "…"`, `info("…"` or `warning("…"`, across lines too.
    let literals = |code: &str| -> Vec<String> {
        let mut found = Vec::new();
        for prefix in ["reason:", "info(", "warning("] {
            for (at, _) in code.match_indices(prefix) {
                let rest = code[at + prefix.len()..].trim_start();
                if let Some(quoted) = rest.strip_prefix('"')
                    && quoted.starts_with(|c: char| c.is_ascii_uppercase())
                {
                    let line = code[..at].lines().count();
                    found.push(format!(
                        "line {line}: {prefix} {}",
                        quoted.split('"').next().unwrap_or_default()
                    ));
                }
            }
        }
        found
    };
    let mut found = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("release/sim.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Tests may build Events from literals.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
            for at in literals(code) {
                found.push(format!("{}: {at}", path.display()));
            }
        }
    }
    assert!(found.is_empty(), "Event reasons written as literals: {found:#?}");
}
