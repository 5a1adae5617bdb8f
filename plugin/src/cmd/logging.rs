//! The log of every subcommand: text or JSON lines, on stderr or stdout,
//! filtered by RUSTOVERLAY_LOG.
//!
//! ANSI colours only when the log goes to a terminal (and NO_COLOR is unset):
//! a file, a pipe, journald or dockerd (which reads a managed plugin's
//! output through pipes) gets plain lines. In JSON, every line of the log is
//! one JSON object, panics and the fatal error included.

use crate::cli::{LogFormat, LogTarget};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// How the process logs; [`Log::init`] installs it.
#[derive(Debug, Clone, Copy)]
pub struct Log {
    pub format: LogFormat,
    pub target: LogTarget,
    /// The filter when RUSTOVERLAY_LOG is unset.
    pub level: &'static str,
}

impl Log {
    /// Install the global subscriber (and, for JSON, a panic hook that logs
    /// the panic as a JSON line instead of Rust's plain message).
    pub fn init(self) {
        let filter = EnvFilter::try_from_env("RUSTOVERLAY_LOG")
            .unwrap_or_else(|_| EnvFilter::new(self.level));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(self.format == LogFormat::Text && self.colours());
        match (self.format, self.target) {
            (LogFormat::Text, LogTarget::Stderr) => builder.with_writer(std::io::stderr).init(),
            (LogFormat::Text, LogTarget::Stdout) => builder.with_writer(std::io::stdout).init(),
            (LogFormat::Json, LogTarget::Stderr) => {
                builder.json().with_writer(std::io::stderr).init()
            }
            (LogFormat::Json, LogTarget::Stdout) => {
                builder.json().with_writer(std::io::stdout).init()
            }
        }
        if self.format == LogFormat::Json {
            let plain_too = self.target == LogTarget::Stdout;
            let default_hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                tracing::error!(panic = %info, "panic");
                if plain_too {
                    default_hook(info);
                }
            }));
        }
    }

    /// Report the error that ends the process: as plain text on stderr
    /// (where systemd and dockerd file it as an error), and as a log event
    /// when the log is elsewhere or JSON. A JSON log on stderr gets the event
    /// only, so that every line of it stays JSON.
    pub fn fatal(self, error: &anyhow::Error) {
        let json_on_stderr = self.format == LogFormat::Json && self.target == LogTarget::Stderr;
        if json_on_stderr || self.target == LogTarget::Stdout {
            tracing::error!(error = %format!("{error:#}"), "exiting");
        }
        if !json_on_stderr {
            eprintln!("rustoverlay: {error:#}");
        }
    }

    fn colours(self) -> bool {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        !no_color
            && match self.target {
                LogTarget::Stderr => std::io::stderr().is_terminal(),
                LogTarget::Stdout => std::io::stdout().is_terminal(),
            }
    }
}
