//! JWT validation and the [`Identity`] it yields.
//!
//! The algorithm list comes from the config, never from the token alone; the key is chosen by
//! the configured key source. The tenant claim must be present and well-formed.

mod claims;
pub mod jwks;
mod jwt;
pub mod throttle;
mod token_cache;

pub use claims::{render_claim, valid_tenant};
pub use jwt::{
    AuthError, KeyError, MAX_TOKEN_LEN, Refusal, TokenMeta, Validator, Verified, mint_hs256,
};

/// Who a client is, as proven by its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: std::sync::Arc<str>,
    /// `sub`, when the token has one (for logs).
    pub subject: Option<String>,
    /// Protected settings to apply on every transaction, `(guc, value)`, in config order.
    pub settings: Vec<(String, String)>,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Role mode: the role every transaction runs as (`SET LOCAL ROLE`).
    pub role: Option<String>,
    /// `jti`, when the token has one (for audit lines).
    pub jti: Option<String>,
    /// The token carries `auth.admin_claim = true` (admin console).
    pub admin: bool,
}
