//! Store keys as Consul keys: `/a/b` is the Consul key `a/b`, and what
//! Consul's HTTP layer would fold, redirect or refuse (`//`, `.` and `..`
//! segments, edge white space) is refused as invalid before anything is
//! sent. Also the escaping of keys in URL paths, and which lease IDs can be
//! Consul sessions.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::validate::check_key;
use crate::{LeaseId, Result, StoreError};

/// Everything but unreserved characters and `/` is escaped in KV paths.
const PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// The Consul key of a store key: `/a/b` -> `a/b`.
pub(super) fn consul_key(key: &str) -> Result<&str> {
    check_key(key)?;
    let k = key.strip_prefix('/').ok_or_else(|| {
        StoreError::Invalid(format!(
            "key {key:?}: the Consul backend takes keys that start with '/' (stored without it, \
             as Consul's HTTP API cannot address a leading slash)"
        ))
    })?;
    if k.is_empty() {
        return Err(StoreError::Invalid(
            "key \"/\" is Consul's root, not a key".into(),
        ));
    }
    check_path(key, k)?;
    Ok(k)
}

/// The Consul prefix of a store prefix ("" and "/" are everything).
pub(super) fn consul_prefix(prefix: &str) -> Result<&str> {
    if prefix.is_empty() {
        return Ok("");
    }
    let p = prefix.strip_prefix('/').ok_or_else(|| {
        StoreError::Invalid(format!(
            "prefix {prefix:?}: the Consul backend takes keys that start with '/'"
        ))
    })?;
    check_path(prefix, p)?;
    Ok(p)
}

/// What Consul's HTTP layer would fold, redirect or refuse.
fn check_path(original: &str, k: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(StoreError::Invalid(format!(
            "key {original:?} {why}, which Consul's HTTP API cannot address"
        )))
    };
    if k.starts_with('/') || k.contains("//") {
        return bad("has an empty path segment ('//')");
    }
    if k.split('/').any(|s| s == "." || s == "..") {
        return bad("has a '.' or '..' path segment");
    }
    if k.trim() != k || k.chars().any(char::is_control) {
        return bad("has leading or trailing white space or control characters");
    }
    Ok(())
}

pub(super) fn kv_path(consul_key: &str) -> String {
    format!("/v1/kv/{}", utf8_percent_encode(consul_key, PATH))
}

/// Consul session IDs are UUIDs; anything else cannot be one of ours (and
/// must not reach a URL path).
pub(super) fn session_id(lease: &LeaseId) -> Option<&str> {
    let id = lease.0.as_str();
    (id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_consul_and_refuse_what_its_http_api_folds() {
        assert_eq!(consul_key("/a/b").unwrap(), "a/b");
        assert_eq!(consul_key("/a/").unwrap(), "a/");
        assert_eq!(consul_key("/fd00:77::_64/x").unwrap(), "fd00:77::_64/x");
        for bad in [
            "", "a/b", "/", "//a", "/a//b", "/a/../b", "/a/.", " /a", "/a ", "/a\n",
        ] {
            assert!(
                matches!(consul_key(bad), Err(StoreError::Invalid(_))),
                "{bad:?} must be refused"
            );
        }
        assert_eq!(consul_prefix("").unwrap(), "");
        assert_eq!(consul_prefix("/").unwrap(), "");
        assert_eq!(consul_prefix("/c/").unwrap(), "c/");
        assert!(consul_prefix("c/").is_err());
        assert_eq!(kv_path("a b/?%#x"), "/v1/kv/a%20b/%3F%25%23x");
    }
}
