use clap::Parser;
use rustoverlay::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

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
    let format = match &cli.command {
        Command::Serve(a) => a.log_format,
        Command::Dump(_) | Command::Gc(_) => LogFormat::Text,
    };
    let filter =
        EnvFilter::try_from_env("RUSTOVERLAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let result = match cli.command {
        Command::Serve(args) => rustoverlay::cmd::serve(args).await,
        Command::Dump(args) => rustoverlay::cmd::dump(args).await,
        Command::Gc(args) => rustoverlay::cmd::gc(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rustoverlay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
