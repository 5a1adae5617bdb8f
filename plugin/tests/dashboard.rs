//! The Grafana dashboard (`examples/grafana/rustoverlay-dashboard.json`)
//! without Grafana (no package of it is reachable here): the shape Grafana's
//! dashboard schema requires of what it uses (a title, a schema version,
//! panels with unique IDs, a type, a grid position inside the 24 columns
//! and not overlapping, Prometheus targets with a refId and a query), and
//! every metric a query names is one the plugin exports. The queries'
//! PromQL syntax is checked by `promtool check rules` in
//! `tests/docker/metrics.sh`, against a live scrape.

use rustoverlay::telemetry::ALL;
use serde_json::Value;
use std::collections::HashSet;

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/grafana/rustoverlay-dashboard.json"
    );
    let text = std::fs::read_to_string(path).expect("the dashboard file");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// The metric names in a query, without a histogram's series suffix.
fn metrics_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("rustoverlay_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s).filter(|base| ALL.contains(base)))
                .unwrap_or(w)
                .to_string()
        })
        .collect()
}

#[test]
fn the_dashboard_has_the_shape_grafana_needs() {
    let d = dashboard();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert_eq!(d["templating"]["list"][0]["type"], "datasource");
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a panel per question the README asks");
    let mut ids = HashSet::new();
    let mut cells = HashSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("an id")),
            "{title}: duplicate id"
        );
        assert!(
            p["type"].as_str().is_some_and(|t| !t.is_empty()),
            "{title}: type"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(
            w > 0 && h > 0 && x + w <= 24,
            "{title}: inside the 24 columns"
        );
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title}: overlaps another panel");
            }
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert!(t["refId"].as_str().is_some(), "{title}: refId");
            let expr = t["expr"].as_str().expect("a query");
            let names = metrics_in(expr);
            assert!(
                !names.is_empty(),
                "{title}: {expr} names no rustoverlay metric"
            );
            for name in names {
                assert!(
                    ALL.contains(&name.as_str()),
                    "{title}: {name} is not exported"
                );
            }
        }
    }
}

#[test]
fn every_exported_metric_has_a_panel() {
    let d = dashboard();
    let used: HashSet<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .flat_map(|t| metrics_in(t["expr"].as_str().unwrap()))
        .collect();
    for name in ALL {
        assert!(used.contains(*name), "{name} is on no panel");
    }
}
