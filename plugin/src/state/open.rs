//! Opening the store named by `--store`, bounded by `--store-timeout`.

use crate::cli::StoreArgs;
use crate::telemetry::MeteredStore;
use kvstore_backends::{
    ConsulConfig, ConsulStore, EtcdConfig, EtcdStore, KvStore, MemoryStore, RedbStore,
    TimeoutStore, TlsFiles,
};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("--store {0:?} is not a store URL; use file:///path/state.redb, etcd://host:2379[,host:2379], consul://host:8500 or memory://")]
    Malformed(String),
    #[error("{0}")]
    Options(String),
    #[error("open the store {url}")]
    Backend {
        url: String,
        #[source]
        source: kvstore_backends::StoreError,
    },
    #[error(
        "the store {url} refused this plugin: check the store's TLS files (--store-ca, \
         --store-cert, --store-key) and credentials (RUSTOVERLAY_STORE_USER/PASSWORD, \
         RUSTOVERLAY_CONSUL_TOKEN)"
    )]
    Refused {
        url: String,
        #[source]
        source: kvstore_backends::StoreError,
    },
}

/// One read at start: a store that refuses this plugin (a wrong CA, client
/// certificate or password) stops it here with the reason, since no retry
/// can succeed. A store that is down or slow does not: the plugin serves,
/// and Docker's calls fail with a store error until it is back.
pub async fn first_contact(store: &dyn KvStore, url: &str) -> Result<(), OpenError> {
    match store.get(&crate::state::keys::vni_next()).await {
        Ok(_) => {
            tracing::info!(store = url, "store reached");
            Ok(())
        }
        Err(source @ kvstore_backends::StoreError::Rejected(_)) => Err(OpenError::Refused {
            url: url.to_string(),
            source,
        }),
        Err(e) => {
            tracing::warn!(
                store = url,
                error = %e,
                "the store is not reachable yet; serving, and Docker's calls fail with a store error until it is"
            );
            Ok(())
        }
    }
}

/// Open the store and bound every call on it by `timeout`.
pub fn open(args: &StoreArgs, timeout: Duration) -> Result<Arc<dyn KvStore>, OpenError> {
    let url = args.store.as_str();
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| OpenError::Malformed(url.to_string()))?;
    let backend = |source| OpenError::Backend {
        url: url.to_string(),
        source,
    };
    let tls_given =
        args.store_ca.is_some() || args.store_cert.is_some() || args.store_key.is_some();
    if tls_given && scheme != "etcd" && scheme != "consul" {
        return Err(OpenError::Options(format!(
            "--store-ca/--store-cert/--store-key only apply to networked stores, not to {scheme}://"
        )));
    }
    let inner: Arc<dyn KvStore> = match scheme {
        "memory" if rest.is_empty() => Arc::new(MemoryStore::new()),
        "file" => {
            if !rest.starts_with('/') {
                return Err(OpenError::Malformed(url.to_string()));
            }
            Arc::new(RedbStore::open(rest).map_err(backend)?)
        }
        "etcd" => {
            let endpoints: Vec<String> = rest
                .trim_end_matches('/')
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect();
            if endpoints.is_empty() {
                return Err(OpenError::Malformed(url.to_string()));
            }
            let mut config = EtcdConfig::new(endpoints);
            config.tls = tls(args)?;
            config.user = args.store_user.clone();
            config.password = args.store_password.clone();
            // Stay inside the per-call bound so the store reports its own error.
            config.request_timeout = timeout;
            config.dial_timeout = timeout.min(Duration::from_secs(3));
            Arc::new(EtcdStore::new(config).map_err(backend)?)
        }
        "consul" => {
            let address = rest.trim_end_matches('/');
            if address.is_empty() || address.contains(',') {
                return Err(OpenError::Options(format!(
                    "--store {url}: give one Consul agent address (the local agent, which forwards to the servers)"
                )));
            }
            let mut config = ConsulConfig::new(address);
            config.token = args.consul_token.clone();
            config.tls = tls(args)?;
            config.request_timeout = timeout;
            config.dial_timeout = timeout.min(Duration::from_secs(3));
            config.session_ttl_min = Duration::from_secs(args.consul_session_ttl_min.max(1));
            // Blocking queries must come back well inside the call bound.
            config.watch_wait = Duration::from_secs(60);
            Arc::new(ConsulStore::new(config).map_err(backend)?)
        }
        _ => return Err(OpenError::Malformed(url.to_string())),
    };
    Ok(Arc::new(MeteredStore::new(TimeoutStore::new(
        inner, timeout,
    ))))
}

fn tls(args: &StoreArgs) -> Result<Option<TlsFiles>, OpenError> {
    match (&args.store_ca, &args.store_cert, &args.store_key) {
        (None, None, None) => Ok(None),
        (Some(ca), cert, key) => {
            if cert.is_some() != key.is_some() {
                return Err(OpenError::Options(
                    "--store-cert and --store-key go together: give both or neither".into(),
                ));
            }
            Ok(Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }))
        }
        (None, _, _) => Err(OpenError::Options(
            "--store-cert/--store-key need --store-ca, the CA that signed the store's certificate"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> StoreArgs {
        StoreArgs {
            store: url.into(),
            store_timeout: 1.0,
            store_ca: None,
            store_cert: None,
            store_key: None,
            store_user: None,
            store_password: None,
            consul_token: None,
            consul_session_ttl_min: 10,
        }
    }

    #[test]
    fn refuses_unknown_and_future_schemes() {
        let t = Duration::from_secs(1);
        assert!(matches!(
            open(&args("bogus"), t),
            Err(OpenError::Malformed(_))
        ));
        assert!(matches!(
            open(&args("redis://x"), t),
            Err(OpenError::Malformed(_))
        ));
        assert!(matches!(
            open(&args("file://relative"), t),
            Err(OpenError::Malformed(_))
        ));
        assert!(matches!(
            open(&args("etcd://"), t),
            Err(OpenError::Malformed(_))
        ));
        assert!(
            open(&args("consul://127.0.0.1:8500"), t).is_ok(),
            "lazy connect"
        );
        assert!(matches!(
            open(&args("consul://a:1,b:2"), t),
            Err(OpenError::Options(_))
        ));
    }

    #[test]
    fn etcd_opens_lazily_and_checks_tls_options() {
        let t = Duration::from_secs(1);
        // Nothing listens there: opening must still succeed (lazy connect).
        assert!(open(&args("etcd://127.0.0.1:1,127.0.0.1:2"), t).is_ok());
        let mut a = args("etcd://127.0.0.1:2379");
        a.store_cert = Some("/x.pem".into());
        assert!(matches!(open(&a, t), Err(OpenError::Options(_))));
        let mut a = args("file:///tmp/x.redb");
        a.store_ca = Some("/ca.pem".into());
        assert!(matches!(open(&a, t), Err(OpenError::Options(_))));
    }
}
