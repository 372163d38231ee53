//! Errors shared across crates, each carrying a kind that decides what the runtime does:
//! retry with backoff (transient), or stop and report (permanent).

use std::fmt;

/// Whether an operation that failed may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A passing condition (connection lost, server restarting, lock conflict): retry with backoff.
    Transient,
    /// A definite failure (bad configuration, missing privilege, server setting): retrying
    /// cannot help, so stop and tell the operator.
    Permanent,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        })
    }
}

/// An error with its kind and a message that names the place it happened.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TidelinkError {
    /// Retry or stop.
    pub kind: ErrorKind,
    /// What went wrong and where, ready for an operator to read.
    pub message: String,
}

impl TidelinkError {
    /// A failure that may pass.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Transient,
            message: message.into(),
        }
    }

    /// A failure that will not pass by retrying.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            message: message.into(),
        }
    }

    /// True when retrying may help.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// Prefixes the message with where the error happened, keeping the kind.
    pub fn context(self, place: impl fmt::Display) -> Self {
        Self {
            kind: self.kind,
            message: format!("{place}: {}", self.message),
        }
    }
}
