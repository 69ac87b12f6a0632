//! What a client sees when something goes wrong: [`ClientError`] and the SQLSTATE codes rlsgate uses.
//!
//! Internal error types convert into a `ClientError` through [`UserFacing`], by exhaustive matches,
//! so that nothing internal reaches a client by accident.

use std::fmt;

/// SQLSTATE codes, named. Never scatter the literals.
pub mod sqlstate {
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const CONNECTION_REJECTED: &str = "08004";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const UNABLE_TO_CONNECT: &str = "08001";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const QUERY_CANCELED: &str = "57014";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error as a client sees it (an `ErrorResponse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub severity: Severity,
    pub sqlstate: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ClientError {
    pub fn fatal(sqlstate: &'static str, message: impl Into<String>) -> Self {
        ClientError {
            severity: Severity::Fatal,
            sqlstate,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn error(sqlstate: &'static str, message: impl Into<String>) -> Self {
        ClientError {
            severity: Severity::Error,
            sqlstate,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// An internal failure: the client gets a session id to quote, the log gets the cause.
    pub fn internal(session_id: u64) -> Self {
        ClientError::fatal(sqlstate::INTERNAL_ERROR, "internal error in rlsgate")
            .with_detail(format!("session id {session_id}; see the rlsgate log"))
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity.as_str(),
            self.sqlstate,
            self.message
        )
    }
}

/// Converts an internal error into what the client may see.
pub trait UserFacing {
    fn to_client_error(&self) -> ClientError;
}
