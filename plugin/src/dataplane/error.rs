//! What can go wrong in the kernel, with the context of the call.

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

impl DataplaneError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DataplaneError::Io {
            context: context.into(),
            source,
        }
    }

    pub(super) fn netlink(context: impl Into<String>, source: rtnetlink::Error) -> Self {
        DataplaneError::Netlink {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;
