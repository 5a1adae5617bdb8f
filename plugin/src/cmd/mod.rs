//! The subcommands: `serve` wires the layers together (`parts`) and serves
//! Docker (and `metrics`, Prometheus, with --metrics-addr); `gc` and `dump`
//! read (and with `gc --apply` clean) the store; `status` shows the cluster;
//! `doctor` checks this host.

mod dns;
mod doctor;
mod inspect;
pub mod logging;
mod metrics;
pub mod parts;
mod serve;
mod status;

pub use doctor::doctor;
pub use inspect::{dump, gc};
pub use parts::{HostParts, HostSettings};
pub use serve::serve;
pub use status::status;

use std::time::Duration;

/// A positive number of seconds from a flag.
fn secs(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value > 0.0) {
        anyhow::bail!("{flag} must be a positive number of seconds, not {value}");
    }
    Ok(Duration::from_secs_f64(value))
}
