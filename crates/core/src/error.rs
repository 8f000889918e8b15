//! One error type for all subsystems, with containerd's error classes.
//!
//! The class decides the gRPC code at the API edge; the message is what `ctr` prints, so
//! messages follow containerd's `"<what>: <class text>"` form (e.g.
//! `namespace "x": already exists`).

use std::fmt;

/// containerd's error classes (`errdefs`), each mapped to one gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Unavailable,
    NotImplemented,
    Canceled,
    DeadlineExceeded,
    Unknown,
}

impl ErrorKind {
    /// The text containerd's `errdefs` errors carry; clients match on it.
    pub fn text(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::NotImplemented => "not implemented",
            ErrorKind::Canceled => "context canceled",
            ErrorKind::DeadlineExceeded => "context deadline exceeded",
            ErrorKind::Unknown => "unknown",
        }
    }
}

/// An error with its class and a message that already names what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error whose message is `"<context>: <class text>"`, containerd's wrapping style.
    pub fn new(kind: ErrorKind, context: impl fmt::Display) -> Self {
        let context = context.to_string();
        let message = if context.is_empty() {
            kind.text().to_string()
        } else {
            format!("{context}: {}", kind.text())
        };
        Error { kind, message }
    }

    /// An error whose message is used verbatim (it already explains itself).
    pub fn with_message(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes more context while keeping the class: `"<context>: <message>"`.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
        }
    }

    pub fn is(&self, kind: ErrorKind) -> bool {
        self.kind == kind
    }

    pub fn invalid_argument(context: impl fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidArgument, context)
    }
    pub fn not_found(context: impl fmt::Display) -> Self {
        Self::new(ErrorKind::NotFound, context)
    }
    pub fn already_exists(context: impl fmt::Display) -> Self {
        Self::new(ErrorKind::AlreadyExists, context)
    }
    pub fn failed_precondition(context: impl fmt::Display) -> Self {
        Self::new(ErrorKind::FailedPrecondition, context)
    }
    pub fn unavailable(context: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Unavailable, context)
    }
    pub fn not_implemented(context: impl fmt::Display) -> Self {
        Self::new(ErrorKind::NotImplemented, context)
    }
    /// An internal failure (I/O, a corrupt record): the message says what and why.
    pub fn unknown(message: impl Into<String>) -> Self {
        Self::with_message(ErrorKind::Unknown, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            std::io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
            _ => ErrorKind::Unknown,
        };
        Error::with_message(kind, err.to_string())
    }
}

/// Adds context to any `Result` whose error converts into [`Error`].
pub trait ResultExt<T> {
    fn context(self, context: impl fmt::Display) -> Result<T>;
    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }
    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().context(context()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_follow_containerd_form() {
        let err = Error::already_exists("namespace \"x\"");
        assert_eq!(err.to_string(), "namespace \"x\": already exists");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        let wrapped = err.context("create");
        assert_eq!(
            wrapped.to_string(),
            "create: namespace \"x\": already exists"
        );
        assert!(wrapped.is(ErrorKind::AlreadyExists));
    }

    #[test]
    fn io_errors_keep_their_class() {
        let err: Error = std::io::Error::from(std::io::ErrorKind::NotFound).into();
        assert!(err.is(ErrorKind::NotFound));
    }
}
