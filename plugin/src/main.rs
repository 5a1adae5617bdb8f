use clap::Parser;
use rustoverlay::cli::{Cli, Command, LogFormat, LogTarget};
use rustoverlay::cmd::logging::Log;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // An empty RUSTOVERLAY_* setting (e.g. `docker plugin set X=` or an empty
    // line in a systemd environment file) means "not set", not "invalid".
    for (key, value) in std::env::vars_os() {
        if value.is_empty() && key.to_string_lossy().starts_with("RUSTOVERLAY_") {
            std::env::remove_var(&key);
        }
    }
    let cli = Cli::parse();
    let log = match &cli.command {
        Command::Serve(a) => Log {
            format: a.log_format,
            target: a.log_target,
            level: "info",
        },
        // `dump` prints the store on stdout: its log stays on stderr.
        Command::Dump(_) | Command::Gc(_) => Log {
            format: LogFormat::Text,
            target: LogTarget::Stderr,
            level: "info",
        },
        // Their report is the output; the log only says what went wrong.
        Command::Status(_) | Command::Doctor(_) => Log {
            format: LogFormat::Text,
            target: LogTarget::Stderr,
            level: "warn",
        },
    };
    log.init();
    let result = match cli.command {
        Command::Serve(args) => rustoverlay::cmd::serve(args).await,
        Command::Dump(args) => rustoverlay::cmd::dump(args).await,
        Command::Gc(args) => rustoverlay::cmd::gc(args).await,
        Command::Status(args) => rustoverlay::cmd::status(args).await,
        // 0, 1 or 2: all ok, warnings, failures.
        Command::Doctor(args) => match rustoverlay::cmd::doctor(args).await {
            Ok(code) => return std::process::ExitCode::from(code),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            log.fatal(&e);
            std::process::ExitCode::FAILURE
        }
    }
}
