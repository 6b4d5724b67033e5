//! The monitoring bundle in `connectors/monitoring/`: the Prometheus alert
//! rules pass `promtool check rules` and their unit tests (a firing and a
//! quiet case per alert), and every metric the rules and the Grafana
//! dashboard name is one the processor exports, used as its type allows.
//! promtool comes from Debian's prometheus package, which
//! `tests/services.sh up` installs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use hartonomous::ops::exporter::names;
use prometheus::proto::MetricType;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors/monitoring")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool").args(args).current_dir(monitoring().join("prometheus")).output().unwrap_or_else(|e| {
        panic!("promtool could not run ({e}): install it with `tests/services.sh up` (Debian package prometheus)")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every alert in the rules has a firing and a quiet case in the unit tests.
#[test]
fn every_alert_has_a_firing_and_a_quiet_case() {
    let rules = std::fs::read_to_string(monitoring().join("prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(monitoring().join("prometheus/alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    for alert in alerts {
        // Each case is an `alertname:` line followed by its `exp_alerts:` line.
        let lines: Vec<&str> = tests.lines().map(str::trim).collect();
        let cases: Vec<&str> = lines.windows(2).filter(|w| w[0] == format!("alertname: {alert}")).map(|w| w[1]).collect();
        assert!(cases.iter().any(|c| *c == "exp_alerts:"), "{alert}: no firing case");
        assert!(cases.iter().any(|c| *c == "exp_alerts: []"), "{alert}: no quiet case");
    }
}

/// The `hartonomous_*` names in `text`, with what follows each (to tell
/// `_bucket` series and the function they sit in).
fn used_names(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("hartonomous_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        // The function the name is an argument of, if any: `rate(`, `deriv(`...
        let before = text[..start].trim_end_matches(['(', ' ']);
        let func = before.rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or("").to_string();
        out.push((text[start..end].to_string(), func));
        i = end;
    }
    out
}

#[test]
fn every_metric_the_rules_and_the_dashboard_use_is_exported_with_its_type() {
    let rules = std::fs::read_to_string(monitoring().join("prometheus/alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(monitoring().join("grafana/hartonomous.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = parsed["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    let mut seen = BTreeSet::new();
    for (source, text) in [("alerts.yml", rules.as_str()), ("hartonomous.json", &exprs.join("\n"))] {
        for (name, func) in used_names(text) {
            // Comments and help texts name metrics too; they follow the same rules.
            let (base, bucket) = match name.strip_suffix("_bucket") {
                Some(b) => (b.to_string(), true),
                None => (name.clone(), false),
            };
            let def = names::ALL.iter().find(|d| d.name == base).unwrap_or_else(|| panic!("{source}: {name} is not exported (src/ops/exporter.rs)"));
            match func.as_str() {
                "rate" | "increase" | "irate" => assert!(
                    def.kind == MetricType::COUNTER || (def.kind == MetricType::HISTOGRAM && bucket),
                    "{source}: {func}({name}) needs a counter or histogram buckets; {name} is {:?}",
                    def.kind
                ),
                "deriv" | "delta" => assert_eq!(def.kind, MetricType::GAUGE, "{source}: {func}({name}) needs a gauge"),
                _ => {}
            }
            if bucket {
                assert_eq!(def.kind, MetricType::HISTOGRAM, "{source}: {name}");
            }
            seen.insert(base);
        }
    }
    // The dashboard shows what operators asked for.
    let titles: Vec<&str> = panels.iter().map(|p| p["title"].as_str().unwrap()).collect();
    for wanted in ["lag per partition (records)", "lag per partition (seconds)", "Throughput", "p50 / p95 / p99", "Dead letters", "Circuit breakers", "In-flight", "Saga outcomes"] {
        assert!(titles.iter().any(|t| t.contains(wanted)), "no panel for {wanted}: {titles:?}");
    }
    for must in ["hartonomous_consumer_lag_records", "hartonomous_consumer_lag_seconds", "hartonomous_stage_latency_seconds", "hartonomous_circuit_breaker_state"] {
        assert!(seen.contains(must), "{must} is not used");
    }
}
