//! The shipped Grafana dashboard and Prometheus alert rules parse, and every series they
//! query is one tidelink exports.

use std::collections::BTreeSet;
use std::path::PathBuf;
use tidelink_runtime::metrics::names;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path)
}

/// `tidelink_*` series named in a PromQL expression, without histogram suffixes.
fn series_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("tidelink_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if exported(base) {
                    name = base;
                }
            }
        }
        found.insert(name.to_string());
        rest = &tail[end..];
    }
    found
}

/// Whether the daemon exports `name`: the runtime's series, or the allocator's, which the
/// binary registers.
fn exported(name: &str) -> bool {
    names::ALL.contains(&name) || names::ALLOCATOR.contains(&name)
}

fn assert_known(series: &BTreeSet<String>, place: &str) {
    for name in series {
        assert!(
            exported(name),
            "{place} queries `{name}`, which tidelink does not export"
        );
    }
}

#[test]
fn dashboard_parses_and_queries_only_exported_series() {
    let text =
        std::fs::read_to_string(deploy("grafana/tidelink-dashboard.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("title");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let series = series_in(target["expr"].as_str().expect("expr"));
            assert!(
                !series.is_empty(),
                "panel {title} queries no tidelink series"
            );
            assert_known(&series, &format!("panel {title}"));
            used.extend(series);
        }
    }
    // Every exported series has a panel.
    for name in names::ALL.iter().chain(names::ALLOCATOR) {
        assert!(used.contains(*name), "no dashboard panel shows {name}");
    }
}

#[test]
fn alert_rules_parse_and_query_only_exported_series() {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yaml")).expect("alert rules");
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("alert rules are YAML");
    let groups = rules["groups"].as_sequence().expect("groups");
    let mut alerts = 0;
    for group in groups {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("expr");
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name} has a summary"
            );
            assert_known(&series_in(expr), &format!("alert {name}"));
            alerts += 1;
        }
    }
    assert!(alerts >= 6);
}

#[test]
fn registered_series_match_the_name_list() {
    let metrics = tidelink_runtime::Metrics::new();
    // Touch one child of every vector so it is gathered.
    metrics
        .source_events
        .with_label_values(&["p", "t", "insert"])
        .inc();
    metrics.source_lag.with_label_values(&["p"]).set(0.0);
    metrics
        .source_retained_wal
        .with_label_values(&["p"])
        .set(0.0);
    metrics.kafka_produced.with_label_values(&["p"]).inc();
    metrics
        .kafka_produce_latency
        .with_label_values(&["p"])
        .observe(0.1);
    metrics
        .sink_applied_rows
        .with_label_values(&["p", "s", "t", "insert"])
        .inc();
    metrics.sink_batches.with_label_values(&["p", "s"]).inc();
    metrics
        .sink_batch_size
        .with_label_values(&["p", "s"])
        .observe(1.0);
    metrics
        .sink_apply_duration
        .with_label_values(&["p", "s"])
        .observe(0.1);
    metrics
        .sink_end_to_end_latency
        .with_label_values(&["p", "s"])
        .observe(0.1);
    metrics.sink_lag.with_label_values(&["p", "s"]).set(0.0);
    metrics
        .sink_consumer_lag
        .with_label_values(&["p", "s", "t", "0"])
        .set(0);
    metrics
        .sink_assigned_partitions
        .with_label_values(&["p", "s"])
        .set(0);
    metrics
        .sink_dead_letter
        .with_label_values(&["p", "s"])
        .inc();
    metrics
        .sink_replays_skipped
        .with_label_values(&["p", "s"])
        .inc();
    metrics.sink_filtered.with_label_values(&["p", "s"]).inc();
    metrics
        .errors
        .with_label_values(&["p", "c", "transient"])
        .inc();
    metrics.backfill_rows.with_label_values(&["p", "t"]).inc();
    metrics.backfill_chunks.with_label_values(&["p", "t"]).inc();
    metrics
        .backfill_remaining
        .with_label_values(&["p", "t"])
        .set(0.0);
    metrics
        .backfill_failed_tables
        .with_label_values(&["p", "t"])
        .set(0);
    metrics.set_ready("p", "source", true);
    let gathered: BTreeSet<String> = metrics
        .registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let listed: BTreeSet<String> = names::ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(gathered, listed);
}
