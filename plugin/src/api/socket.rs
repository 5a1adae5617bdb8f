//! The plugin socket: refuse to start over a live instance, replace a stale
//! socket file left by a crash, and keep it mode 0660.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "another rustoverlay is already serving on {0}; stop it first or pick another --socket"
    )]
    InUse(String),
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub async fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let shown = path.display().to_string();
    let io = |context: &'static str| {
        let shown = shown.clone();
        move |source| SocketError::Io {
            context,
            path: shown,
            source,
        }
    };
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(SocketError::InUse(shown));
        }
        std::fs::remove_file(path).map_err(io("remove the stale socket"))?;
        tracing::info!(socket = %shown, "replaced a stale socket left by an earlier run");
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    }
    let listener = UnixListener::bind(path).map_err(io("listen on"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io("set the mode of"))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn live_socket_is_refused_and_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let first = bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(bind(&path).await, Err(SocketError::InUse(_))));
        drop(first);
        // The file stays behind, as after a crash: it is replaced.
        assert!(path.exists());
        bind(&path).await.unwrap();
    }
}
