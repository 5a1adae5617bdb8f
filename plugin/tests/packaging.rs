//! What the repository ships besides the binary: the systemd unit passes
//! `systemd-analyze verify`, and the managed plugin's config.json needs
//! nothing made on the host, logs where dockerd does not call every line an
//! error, and only names settings the binary reads.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALLED_BIN: &str = "/usr/local/bin/rustoverlay";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// `systemd-analyze verify` also checks that ExecStart's binary exists, and
/// the unit names the installed path (README: `install ...
/// /usr/local/bin/rustoverlay`). So a copy of the unit, identical but for
/// that path, which points at the binary cargo built, is verified.
#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = read("packaging/rustoverlay.service");
    let exec: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(
        exec,
        [format!("ExecStart={INSTALLED_BIN} serve").as_str()],
        "the unit starts the binary where the README installs it"
    );
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("rustoverlay.service");
    std::fs::write(
        &copy,
        unit.replace(
            &format!("ExecStart={INSTALLED_BIN} "),
            &format!("ExecStart={} ", env!("CARGO_BIN_EXE_rustoverlay")),
        ),
    )
    .unwrap();

    let out = Command::new("systemd-analyze")
        .args(["verify", "--recursive-errors=no"])
        .arg(&copy)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-analyze ({e}): install Debian's package systemd \
                 (scripts/test lists it in PACKAGES)"
            )
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Warnings (an unknown key, a value it cannot parse) exit 0: any line
    // about the unit fails the test too.
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains("rustoverlay")).collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify packaging/rustoverlay.service (ExecStart pointed at the \
         built binary): {}\n{said}",
        out.status
    );
}

fn config() -> Value {
    serde_json::from_str(&read("config.json")).expect("config.json is JSON")
}

fn env_value<'a>(config: &'a Value, name: &str) -> Option<&'a Value> {
    config["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| &e["value"])
}

/// `docker plugin enable` fails ("stat ...: no such file or directory") when
/// a bind mount's source is missing on the host: every default source is a
/// directory every Linux host has.
#[test]
fn managed_plugin_mounts_need_nothing_made_on_the_host() {
    let config = config();
    let mounts = config["mounts"].as_array().unwrap();
    let sources: Vec<&str> = mounts
        .iter()
        .map(|m| m["source"].as_str().unwrap())
        .collect();
    for source in &sources {
        assert!(
            ["/run", "/var/lib", "/etc"].contains(source),
            "mount source {source} is not a directory every host has"
        );
    }
    let by_name = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount {name}"))
    };
    // The settings users know stay: state.source and certs.source.
    for (name, dest, opts) in [
        ("state", "/host/var/lib", ["bind", "rw"]),
        ("certs", "/host/etc", ["bind", "ro"]),
    ] {
        let m = by_name(name);
        assert_eq!(m["destination"], dest, "mount {name}");
        assert_eq!(m["settable"], serde_json::json!(["source"]), "mount {name}");
        // Not rbind: nothing mounted under the host's /var/lib (Docker's
        // layers) or /etc is copied into the plugin's mount namespace.
        assert_eq!(m["options"], serde_json::json!(opts), "mount {name}");
    }
    // The default store is the host's /var/lib/rustoverlay/state.redb,
    // through scripts/build-plugin's link /var/lib/rustoverlay ->
    // /host/var/lib/rustoverlay.
    assert_eq!(
        env_value(&config, "RUSTOVERLAY_STORE").unwrap(),
        "file:///var/lib/rustoverlay/state.redb"
    );
    let build = read("scripts/build-plugin");
    for link in [
        r#"ln -s /host/var/lib/rustoverlay "$root/var/lib/rustoverlay""#,
        r#"ln -s /host/etc/rustoverlay "$root/etc/rustoverlay""#,
    ] {
        assert!(build.contains(link), "scripts/build-plugin lacks: {link}");
    }
}

/// Docker files a plugin's stderr under level=error: the managed plugin logs
/// to stdout. And every RUSTOVERLAY_* setting config.json offers is read by
/// `rustoverlay serve` (a misspelt one would be silently ignored).
#[test]
fn managed_plugin_settings_are_the_binary_s() {
    let config = config();
    assert_eq!(
        env_value(&config, "RUSTOVERLAY_LOG_TARGET").unwrap(),
        "stdout"
    );
    let help = Command::new(env!("CARGO_BIN_EXE_rustoverlay"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    // Read from the environment only (not flags, so not in --help).
    let env_only = [
        "RUSTOVERLAY_LOG",
        "RUSTOVERLAY_STORE_USER",
        "RUSTOVERLAY_STORE_PASSWORD",
        "RUSTOVERLAY_CONSUL_TOKEN",
    ];
    let names: Vec<&str> = config["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in names {
        assert!(
            env_only.contains(&name) || help.contains(&format!("[env: {name}=")),
            "config.json sets {name}, which `rustoverlay serve` does not read"
        );
    }
}
