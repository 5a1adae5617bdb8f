//! Named network namespaces for overlays, and netlink connections inside them.
//!
//! Each overlay's bridge lives in a namespace of its own, as in Docker's own
//! overlay driver: the host's firewall (Docker sets the FORWARD policy to DROP
//! and turns on bridge netfilter) then never sees frames bridged between
//! containers, and overlapping subnets of different networks cannot meet.
//!
//! A namespace is kept alive by a bind mount of its nsfs file under the
//! plugin's state directory, so it survives a plugin restart. `setns` is only
//! ever called on a short-lived OS thread, never on a tokio worker: the thread
//! opens the netlink socket and exits, and the socket stays in the namespace.

use super::error::DataplaneError;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use rtnetlink::Handle;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Where the namespaces' bind mounts live.
#[derive(Debug, Clone)]
pub struct NetnsDir {
    dir: PathBuf,
}

impl NetnsDir {
    pub fn new(state_dir: &Path) -> Self {
        NetnsDir {
            dir: state_dir.join("netns"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// True when a namespace of that name is mounted (not just a stale file).
    pub fn exists(&self, name: &str) -> bool {
        let path = self.path(name);
        is_nsfs_mount(&path)
    }

    /// Create the namespace if it does not exist. Idempotent.
    pub fn create(&self, name: &str) -> Result<PathBuf, DataplaneError> {
        let path = self.path(name);
        if is_nsfs_mount(&path) {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| DataplaneError::io(format!("create {}", self.dir.display()), e))?;
        File::create(&path)
            .map_err(|e| DataplaneError::io(format!("create {}", path.display()), e))?;
        let target = path.clone();
        let result = std::thread::spawn(move || -> nix::Result<()> {
            // Only this thread moves; it ends right after the mount.
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .join()
        .map_err(|_| DataplaneError::Setup(format!("namespace thread for {name} panicked")))?;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&path);
            return Err(DataplaneError::io(
                format!("create network namespace {}", path.display()),
                e.into(),
            ));
        }
        Ok(path)
    }

    /// Remove the namespace's mount and file; "already gone" is success.
    /// The namespace itself ends once nothing holds it any more.
    pub fn delete(&self, name: &str) -> Result<(), DataplaneError> {
        let path = self.path(name);
        if is_nsfs_mount(&path) {
            umount2(&path, MntFlags::MNT_DETACH)
                .map_err(|e| DataplaneError::io(format!("unmount {}", path.display()), e.into()))?;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DataplaneError::io(format!("remove {}", path.display()), e)),
        }
    }

    /// Names of the namespaces present (for reconciliation at start-up).
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| self.exists(n))
            .collect()
    }
}

/// A file is a live namespace handle when it is an nsfs mount.
fn is_nsfs_mount(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    match nix::sys::statfs::statfs(path) {
        Ok(st) => st.filesystem_type().0 == NSFS_MAGIC,
        Err(_) => false,
    }
}

/// Open a netlink connection inside the namespace at `path`. The connection
/// task runs on the current tokio runtime.
pub fn connect_in(path: &Path) -> Result<Handle, DataplaneError> {
    let ns = File::open(path)
        .map_err(|e| DataplaneError::io(format!("open namespace {}", path.display()), e))?;
    let runtime = tokio::runtime::Handle::current();
    let (conn, handle, _) = std::thread::spawn(move || {
        // The socket must be registered with the runtime's reactor.
        let _enter = runtime.enter();
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        rtnetlink::new_connection()
    })
    .join()
    .map_err(|_| DataplaneError::Setup("netlink thread panicked".into()))?
    .map_err(|e| DataplaneError::io(format!("netlink socket in {}", path.display()), e))?;
    tokio::spawn(conn);
    Ok(handle)
}
