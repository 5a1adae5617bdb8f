//! What etcd's errors mean to the store: gRPC status codes mapped to
//! [`StoreError`] variants (transient or not), the detection of requests that
//! never got a connection (safe to repeat on another endpoint), and readable
//! messages without tonic's metadata dump. Shared by every etcd call.

use std::time::Duration;

use tonic::Code;

use crate::StoreError;

pub(super) fn missing_header(target: &str, what: &str) -> StoreError {
    StoreError::backend(
        format!("{target}: {what}"),
        "etcd answered without a response header",
    )
}

pub(super) fn status_code(e: &etcd_client::Error) -> Option<Code> {
    match e {
        etcd_client::Error::GRpcStatus(status) => Some(status.code()),
        _ => None,
    }
}

/// A request that failed to get a connection, so it was never sent.
pub(super) fn is_connect_error(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    if status.code() != Code::Unavailable {
        return false;
    }
    // tonic reports "connection refused / timed out" as Unavailable with the
    // connector's error as the source; etcd's own Unavailable answers have none.
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused
                    | TimedOut
                    | AddrNotAvailable
                    | HostUnreachable
                    | NetworkUnreachable
            );
        }
        source = e.source();
    }
    false
}

/// An answer that says more about the member than about the request: it has
/// no leader (in a minority), or it did not answer in time (stalled). Calls
/// after it should go to another member, and so should watches.
pub(super) fn is_member_trouble(e: &etcd_client::Error) -> bool {
    matches!(
        status_code(e),
        Some(Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
    )
}

/// The member refused the request because it has no leader: the request
/// was not applied anywhere, so it can go to another member at once. (A
/// timed-out request may have been applied, so it is never sent again.)
pub(super) fn is_refused_without_leader(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == Code::Unavailable && status.message().contains("no leader")
        }
        _ => false,
    }
}

/// The message of an error with its causes, without tonic's metadata dump.
pub(super) fn describe(e: &etcd_client::Error) -> String {
    let mut text = match e {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    };
    let mut source = match e {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        other => std::error::Error::source(other),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub(super) fn map_error(
    target: &str,
    timeout: Duration,
    what: &str,
    e: etcd_client::Error,
) -> StoreError {
    let what = if what.is_empty() {
        String::new()
    } else {
        format!("{what}: ")
    };
    let tls = match &e {
        etcd_client::Error::GRpcStatus(status) => crate::tls::rejection(status),
        other => crate::tls::rejection(other),
    };
    if let Some(why) = tls {
        return StoreError::Rejected(format!("{what}{target}: {why}"));
    }
    let detail = describe(&e);
    let unavailable = || StoreError::Unavailable(format!("{what}{target}: {detail}"));
    // The detail, not the error itself: tonic's Display dumps the metadata.
    let backend = || StoreError::backend(format!("{what}{target}"), detail.clone());
    match &e {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::Unknown | Code::Aborted => unavailable(),
            // tonic's own request timeout comes back as Cancelled.
            Code::Cancelled if status.message().contains("Timeout expired") => {
                StoreError::Timeout(timeout)
            }
            Code::Cancelled => unavailable(),
            Code::DeadlineExceeded => StoreError::Timeout(timeout),
            // A configuration problem, not a bad request.
            Code::InvalidArgument if status.message().contains("user name is empty") => {
                StoreError::Rejected(format!(
                    "{what}{target}: {detail} (etcd has authentication enabled: configure a user and password)"
                ))
            }
            Code::Unauthenticated | Code::PermissionDenied => {
                StoreError::Rejected(format!("{what}{target}: {detail}"))
            }
            // etcd does not say which lease; the lease calls fill it in.
            Code::NotFound if status.message().contains("lease") => {
                StoreError::LeaseNotFound(String::new())
            }
            Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::OutOfRange
            | Code::FailedPrecondition => StoreError::Invalid(format!("{what}{target}: {detail}")),
            code => StoreError::backend(format!("{what}{target}"), format!("{detail} ({code:?})")),
        },
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_) => unavailable(),
        etcd_client::Error::LeaseKeepAliveError(msg) if msg.contains("not found") => {
            StoreError::LeaseNotFound(String::new())
        }
        etcd_client::Error::LeaseKeepAliveError(_) => unavailable(),
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
            StoreError::Invalid(format!("{what}{target}: {detail}"))
        }
        _ => backend(),
    }
}
