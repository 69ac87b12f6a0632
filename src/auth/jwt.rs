//! Token validation with `jsonwebtoken`.

use std::str::FromStr;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::Value;

use super::Identity;
use super::claims::{lookup, render_claim, valid_tenant};
use super::jwks::{Jwks, JwksConfig, Lookup};
use super::throttle::Claimed;
use super::token_cache::{Cached, TokenCache};
use crate::config::AuthConfig;
use crate::error::{ClientError, UserFacing, sqlstate};
use std::collections::BTreeMap;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Setting values longer than this are refused.
const MAX_SETTING_LEN: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token was given as the password")]
    Empty,
    #[error("token is larger than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token algorithm is not allowed")]
    BadAlgorithm,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    BadIssuer,
    #[error("token audience is not accepted")]
    BadAudience,
    #[error("token lacks the required claim {0:?}")]
    MissingClaim(String),
    #[error("token claim {0:?} is not well-formed")]
    BadClaim(String),
    #[error("token names a key (kid) that is not known")]
    UnknownKid,
    #[error("token must name its key (kid): the key set has several")]
    KidRequired,
    #[error("token headers jku/x5u are not accepted")]
    ForbiddenHeader,
    #[error("login user name does not match the token's {0:?} claim")]
    UserMismatch(String),
    #[error("role {0:?} from the token is not allowed")]
    RoleNotAllowed(String),
    #[error("token was rejected")]
    Other,
}

impl AuthError {
    /// The bounded reason of `rlsgate_logins_total{reason}`.
    pub fn login_failure(&self) -> crate::metrics::LoginFailure {
        use crate::metrics::LoginFailure;
        match self {
            AuthError::Expired => LoginFailure::Expired,
            AuthError::BadSignature => LoginFailure::BadSignature,
            AuthError::BadAlgorithm => LoginFailure::BadAlgorithm,
            AuthError::UnknownKid | AuthError::KidRequired => LoginFailure::UnknownKid,
            AuthError::MissingClaim(_) => LoginFailure::MissingClaim,
            AuthError::BadClaim(_)
            | AuthError::NotYetValid
            | AuthError::BadIssuer
            | AuthError::BadAudience
            | AuthError::UserMismatch(_)
            | AuthError::RoleNotAllowed(_) => LoginFailure::BadClaim,
            AuthError::Empty
            | AuthError::TooLarge
            | AuthError::Malformed
            | AuthError::ForbiddenHeader => LoginFailure::Malformed,
            AuthError::Other => LoginFailure::Other,
        }
    }
}

impl UserFacing for AuthError {
    fn to_client_error(&self) -> ClientError {
        let e = ClientError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            format!("invalid token: {self}"),
        );
        match self {
            AuthError::Empty | AuthError::Malformed => {
                e.with_hint("pass a JWT as the password, e.g. PGPASSWORD=$TOKEN")
            }
            AuthError::Expired => e.with_hint("obtain a fresh token and reconnect"),
            AuthError::TooLarge
            | AuthError::BadSignature
            | AuthError::BadAlgorithm
            | AuthError::NotYetValid
            | AuthError::BadIssuer
            | AuthError::BadAudience
            | AuthError::MissingClaim(_)
            | AuthError::BadClaim(_)
            | AuthError::UnknownKid
            | AuthError::KidRequired
            | AuthError::ForbiddenHeader
            | AuthError::UserMismatch(_)
            | AuthError::RoleNotAllowed(_)
            | AuthError::Other => e,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unknown algorithm {0:?}")]
    UnknownAlgorithm(String),
    #[error("algorithms {0:?} need different key types; configure one family")]
    MixedFamilies(Vec<String>),
    #[error("HS* algorithms need auth.hs_secret")]
    MissingSecret,
    #[error("asymmetric algorithms need auth.public_key_pem")]
    MissingPublicKey,
    #[error("cannot read public key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("public key is not a valid PEM for {family}: {reason}")]
    BadKey {
        family: &'static str,
        reason: String,
    },
    #[error("auth.hs_secret must be at least 32 bytes")]
    WeakSecret,
    #[error("JWKS: {0}")]
    Jwks(String),
}

/// Where a token's key comes from.
enum KeySource {
    /// `hs_secret`: the only key HS* tokens are ever checked with.
    Secret(std::sync::Arc<DecodingKey>),
    /// `public_key_pem` for one asymmetric family.
    Pem(AlgorithmFamily, std::sync::Arc<DecodingKey>),
    /// `jwks_file` / `jwks_url`, keys chosen by `kid`.
    Jwks(Jwks),
}

/// A token that verified: who it proves, and its header's `kid`.
#[derive(Debug)]
pub struct Verified {
    pub identity: Identity,
    pub kid: Option<String>,
}

/// Validates tokens against the configured key sources, algorithms and claims.
pub struct Validator {
    algorithms: Vec<Algorithm>,
    sources: Vec<KeySource>,
    /// The claim checks, one copy per accepted algorithm (each accepting that algorithm only):
    /// a token is checked against its header's, with nothing to clone or allocate per login.
    validations: Vec<Validation>,
    tenant_claim: String,
    user_claim: Option<String>,
    admin_claim: Option<String>,
    role: Option<RoleMode>,
    /// `(guc, claim path)` pairs from `[context]`.
    context: Vec<(String, String)>,
    /// Tokens that verified (see [`TokenCache`]): a reload builds a new validator, and so an
    /// empty cache.
    verified: TokenCache,
}

/// `SET LOCAL ROLE` from a claim (allow-listed) or a template.
struct RoleMode {
    claim: Option<String>,
    template: Option<String>,
    allow: Vec<String>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// Fields of the token worth an audit line, and who it claims to be (for the login throttle).
/// All unverified.
#[derive(Debug, Clone)]
pub struct TokenMeta {
    pub kid: Option<String>,
    pub jti: Option<String>,
    pub claimed: Claimed,
}

/// A refused token, and whether its signature verified. A verified token was refused for its
/// claims (expired, not yet valid, issuer, audience, tenant…): that is the issuer's doing, not
/// an attacker's, and the login throttle does not count it.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub error: AuthError,
    pub signature_verified: bool,
}

impl Refusal {
    fn unverified(error: AuthError) -> Self {
        Refusal {
            error,
            signature_verified: false,
        }
    }

    fn verified(error: AuthError) -> Self {
        Refusal {
            error,
            signature_verified: true,
        }
    }
}

impl Validator {
    pub async fn new(
        auth: &AuthConfig,
        context: &BTreeMap<String, String>,
    ) -> Result<Self, KeyError> {
        let algorithms = auth
            .algorithms
            .iter()
            .map(|a| Algorithm::from_str(a).map_err(|_| KeyError::UnknownAlgorithm(a.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut sources = Vec::new();
        if let Some(secret) = &auth.hs_secret {
            if secret.len() < 32 {
                return Err(KeyError::WeakSecret);
            }
            sources.push(KeySource::Secret(std::sync::Arc::new(
                DecodingKey::from_secret(secret.as_bytes()),
            )));
        }
        if let Some(path) = &auth.public_key_pem {
            let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let family = algorithms
                .iter()
                .map(|a| a.family())
                .find(|f| *f != AlgorithmFamily::Hmac)
                .ok_or(KeyError::MissingPublicKey)?;
            let (name, parsed) = match family {
                AlgorithmFamily::Rsa => ("RSA", DecodingKey::from_rsa_pem(&pem)),
                AlgorithmFamily::Ec => ("EC", DecodingKey::from_ec_pem(&pem)),
                AlgorithmFamily::Ed => ("EdDSA", DecodingKey::from_ed_pem(&pem)),
                AlgorithmFamily::Hmac => ("HMAC", Err(ErrorKind::InvalidKeyFormat.into())),
            };
            let key = parsed.map_err(|e| KeyError::BadKey {
                family: name,
                reason: e.to_string(),
            })?;
            sources.push(KeySource::Pem(family, std::sync::Arc::new(key)));
        }
        if auth.jwks_file.is_some() || auth.jwks_url.is_some() {
            let cfg = JwksConfig {
                file: auth.jwks_file.clone(),
                url: auth.jwks_url.clone(),
                ca_file: auth.jwks_ca_file.clone(),
                refresh_interval: auth.jwks_refresh,
                min_refetch_interval: auth.jwks_min_refetch,
                timeout: auth.jwks_timeout,
                max_bytes: auth.jwks_max_bytes,
            };
            sources.push(KeySource::Jwks(
                Jwks::load(cfg)
                    .await
                    .map_err(|e| KeyError::Jwks(e.to_string()))?,
            ));
        }
        let needs_secret = algorithms
            .iter()
            .any(|a| a.family() == AlgorithmFamily::Hmac);
        let has_secret = sources.iter().any(|s| matches!(s, KeySource::Secret(_)));
        if needs_secret && !has_secret {
            return Err(KeyError::MissingSecret);
        }
        if algorithms
            .iter()
            .any(|a| a.family() != AlgorithmFamily::Hmac)
            && !sources
                .iter()
                .any(|s| matches!(s, KeySource::Pem(..) | KeySource::Jwks(_)))
        {
            return Err(KeyError::MissingPublicKey);
        }
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.clone();
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = auth.leeway.as_secs();
        match &auth.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &auth.issuer {
            validation.set_issuer(&[iss]);
        }
        let role = (auth.role_claim.is_some() || auth.role_template.is_some()).then(|| RoleMode {
            claim: auth.role_claim.clone(),
            template: auth.role_template.clone(),
            allow: auth.role_allow.clone(),
        });
        let validations = algorithms
            .iter()
            .map(|alg| {
                let mut one = validation.clone();
                one.algorithms = vec![*alg];
                one
            })
            .collect();
        Ok(Validator {
            algorithms,
            sources,
            validations,
            tenant_claim: auth.tenant_claim.clone(),
            user_claim: auth.user_claim.clone(),
            admin_claim: auth.admin_claim.clone(),
            role,
            context: context
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            verified: TokenCache::default(),
        })
    }

    /// Background refresh of JWKS sources until `stop` fires.
    pub fn spawn_refresh(&self, stop: &tokio_util::sync::CancellationToken) {
        for s in &self.sources {
            if let KeySource::Jwks(j) = s {
                j.spawn_refresh(stop.clone());
            }
        }
    }

    /// Header and payload fields for audit lines and the throttle (best effort; unverified).
    pub fn meta(token: &str) -> TokenMeta {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return TokenMeta {
                kid: None,
                jti: None,
                claimed: Claimed::Unreadable,
            };
        }
        let kid = jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid);
        let claims = jsonwebtoken::dangerous::insecure_decode_claims::<Value>(token).ok();
        let text = |name: &str| {
            claims
                .as_ref()
                .and_then(|c| c.get(name))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let claimed = match (&claims, text("sub")) {
            (Some(Value::Object(_)), Some(sub)) => Claimed::Subject(sub),
            (Some(Value::Object(_)), None) => Claimed::NoSubject,
            _ => Claimed::Unreadable,
        };
        TokenMeta {
            kid,
            jti: text("jti"),
            claimed,
        }
    }

    /// Check a token and build the identity it proves. `login_user` is the user name from the
    /// StartupMessage (checked against `auth.user_claim` when set).
    pub async fn validate(&self, token: &str, login_user: &str) -> Result<Identity, AuthError> {
        self.check(token, login_user).await.map_err(|r| r.error)
    }

    /// As [`Validator::validate`], telling a refusal of a token whose signature verified from
    /// one anybody could cause.
    pub async fn check(&self, token: &str, login_user: &str) -> Result<Identity, Refusal> {
        self.verify(token, login_user).await.map(|v| v.identity)
    }

    /// As [`Validator::check`], with the `kid` of the token's header (for the audit record; no
    /// second decoding of the header).
    pub async fn verify(&self, token: &str, login_user: &str) -> Result<Verified, Refusal> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Refusal::unverified(AuthError::Empty));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(Refusal::unverified(AuthError::TooLarge));
        }
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(hit) = self.verified.get(token, now) {
            // Only while the header still selects the key that verified it.
            let same_key = self
                .select_key(hit.alg, hit.kid.as_deref())
                .is_ok_and(|key| std::sync::Arc::ptr_eq(&key, &hit.key));
            if same_key {
                let identity = self
                    .identity(&hit.claims, login_user)
                    .map_err(Refusal::verified)?;
                return Ok(Verified {
                    identity,
                    kid: hit.kid.clone(),
                });
            }
            self.verified.remove(token);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Refusal::unverified(map_error(e.kind())))?;
        if header.jku.is_some() || header.x5u.is_some() {
            return Err(Refusal::unverified(AuthError::ForbiddenHeader));
        }
        // (only a configured algorithm has its claim checks)
        let Some(validation) = self
            .validations
            .iter()
            .find(|v| v.algorithms == [header.alg])
        else {
            return Err(Refusal::unverified(AuthError::BadAlgorithm));
        };
        let key = match self.select_key(header.alg, header.kid.as_deref()) {
            Err(AuthError::UnknownKid) => {
                // A key may have rotated in: refetch (rate-limited) and look again.
                if !Box::pin(self.refetch_for_unknown_kid()).await {
                    return Err(Refusal::unverified(AuthError::UnknownKid));
                }
                self.select_key(header.alg, header.kid.as_deref())
                    .map_err(Refusal::unverified)?
            }
            other => other.map_err(Refusal::unverified)?,
        };
        let data = jsonwebtoken::decode::<Value>(token, &key, validation).map_err(|e| {
            let error = map_error(e.kind());
            if verified_before(e.kind()) {
                Refusal::verified(error)
            } else {
                Refusal::unverified(error)
            }
        })?;
        let identity = self
            .identity(&data.claims, login_user)
            .map_err(Refusal::verified)?;
        if let Some(cached) = Cached::new(header.alg, header.kid.clone(), key, data.claims) {
            self.verified.insert(token, cached, now);
        }
        Ok(Verified {
            identity,
            kid: header.kid,
        })
    }

    /// Refetch every JWKS source (rate-limited); whether any installed a new set. (Boxed by
    /// the caller: an HTTP fetch's state would size every login's future.)
    async fn refetch_for_unknown_kid(&self) -> bool {
        let mut refreshed = false;
        for s in &self.sources {
            if let KeySource::Jwks(j) = s {
                refreshed |= j.refetch_for_unknown_kid().await;
            }
        }
        refreshed
    }

    /// The key for this header: HS* only ever uses the secret; asymmetric algorithms use the JWKS
    /// key named by `kid`, or the PEM key.
    fn select_key(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<std::sync::Arc<DecodingKey>, AuthError> {
        let family = alg.family();
        if family == AlgorithmFamily::Hmac {
            return self
                .sources
                .iter()
                .find_map(|s| match s {
                    KeySource::Secret(k) => Some(std::sync::Arc::clone(k)),
                    _ => None,
                })
                .ok_or(AuthError::BadAlgorithm);
        }
        let mut outcome = Err(AuthError::UnknownKid);
        for s in &self.sources {
            match s {
                KeySource::Jwks(j) => match j.lookup(kid, alg) {
                    Lookup::Key(k) => return Ok(k),
                    Lookup::KidRequired => outcome = Err(AuthError::KidRequired),
                    Lookup::AlgorithmMismatch => outcome = Err(AuthError::BadAlgorithm),
                    Lookup::UnknownKid | Lookup::NoKeys => {}
                },
                KeySource::Pem(f, k) if *f == family && kid.is_none() => {
                    return Ok(std::sync::Arc::clone(k));
                }
                KeySource::Pem(f, k)
                    if *f == family
                    // A PEM key has no kid; accept it for a kid only when no JWKS knows the kid.
                    && outcome.is_err()
                        && !self.sources.iter().any(|s| matches!(s, KeySource::Jwks(_))) =>
                {
                    return Ok(std::sync::Arc::clone(k));
                }
                _ => {}
            }
        }
        outcome
    }

    fn identity(&self, claims: &Value, login_user: &str) -> Result<Identity, AuthError> {
        let tenant = match lookup(claims, &self.tenant_claim) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(_) => return Err(AuthError::BadClaim(self.tenant_claim.clone())),
            None => return Err(AuthError::MissingClaim(self.tenant_claim.clone())),
        };
        if !valid_tenant(&tenant) {
            return Err(AuthError::BadClaim(self.tenant_claim.clone()));
        }
        if let Some(path) = &self.user_claim {
            let user = lookup(claims, path)
                .and_then(render_claim)
                .ok_or_else(|| AuthError::MissingClaim(path.clone()))?;
            if user != login_user {
                return Err(AuthError::UserMismatch(path.clone()));
            }
        }
        let mut settings = Vec::with_capacity(self.context.len());
        for (guc, path) in &self.context {
            let value = if *path == self.tenant_claim {
                tenant.clone()
            } else {
                let Some(v) = lookup(claims, path).and_then(render_claim) else {
                    return Err(AuthError::MissingClaim(path.clone()));
                };
                if v.len() > MAX_SETTING_LEN || v.contains('\0') {
                    return Err(AuthError::BadClaim(path.clone()));
                }
                v
            };
            settings.push((guc.clone(), value));
        }
        let role = match &self.role {
            Some(mode) => Some(mode.role(claims)?),
            None => None,
        };
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(AuthError::MissingClaim("exp".into()))?;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_string);
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .map(str::to_string);
        let admin = self
            .admin_claim
            .as_ref()
            .is_some_and(|p| lookup(claims, p) == Some(&Value::Bool(true)));
        Ok(Identity {
            tenant: tenant.into(),
            subject,
            settings,
            expires_at,
            role,
            jti,
            admin,
        })
    }
}

impl RoleMode {
    fn role(&self, claims: &Value) -> Result<String, AuthError> {
        let role = match (&self.template, &self.claim) {
            (Some(t), _) => fill_template(t, claims)?,
            (None, Some(c)) => lookup(claims, c)
                .and_then(render_claim)
                .ok_or_else(|| AuthError::MissingClaim(c.clone()))?,
            (None, None) => return Err(AuthError::Other),
        };
        let well_formed = !role.is_empty()
            && role.len() <= 63
            && role
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !role.starts_with(|c: char| c.is_ascii_digit())
            // reserved: `set_config('role', 'none', …)` would switch back to the pool's own role
            && !matches!(role.as_str(), "none" | "public");
        if !well_formed || (!self.allow.is_empty() && !self.allow.contains(&role)) {
            return Err(AuthError::RoleNotAllowed(role));
        }
        Ok(role)
    }
}

/// `tenant_{store_id}` → `tenant_north`.
fn fill_template(template: &str, claims: &Value) -> Result<String, AuthError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return Err(AuthError::Other);
        };
        let path = &rest[open + 1..open + close];
        let value = lookup(claims, path)
            .and_then(render_claim)
            .ok_or_else(|| AuthError::MissingClaim(path.to_string()))?;
        out.push_str(
            &value
                .to_ascii_lowercase()
                .replace(['-', '.', ':', '@'], "_"),
        );
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether `jsonwebtoken::decode` raises this only after the signature verified. It checks the
/// header (already parsed above, so it cannot fail there), the algorithm, the signature, and only
/// then decodes and validates the claims. A Base64 error may come from the signature segment as
/// well as the payload, so it counts as unverified (a signer never produces bad base64).
fn verified_before(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ExpiredSignature
            | ErrorKind::ImmatureSignature
            | ErrorKind::InvalidIssuer
            | ErrorKind::InvalidAudience
            | ErrorKind::InvalidSubject
            | ErrorKind::MissingRequiredClaim(_)
            | ErrorKind::InvalidClaimFormat(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_)
    )
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => AuthError::BadAlgorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::BadIssuer,
        ErrorKind::InvalidAudience => AuthError::BadAudience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
        ErrorKind::InvalidClaimFormat(c) => AuthError::BadClaim(c.clone()),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed,
        _ => AuthError::Other,
    }
}

/// Mint an HS* token (for `rlsgate token`, the demo and tests).
pub fn mint_hs256(secret: &[u8], claims: &Value) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    async fn validator_with(extra_auth: &str) -> Validator {
        let text = format!(
            "[upstream]\ndatabase = \"app\"\nuser = \"u\"\n[auth]\nhs_secret = \"{SECRET}\"\nissuer = \"iss-1\"\nleeway = \"0s\"\n{extra_auth}\n[context]\n\"app.current_store_id\" = \"store_id\"\n\"app.user_id\" = \"sub\"\n"
        );
        let config = crate::config::Config::from_toml(&text).expect("test config");
        Validator::new(&config.auth, &config.context.settings)
            .await
            .expect("validator")
    }

    async fn validator() -> Validator {
        validator_with("").await
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[tokio::test]
    async fn accepts_a_good_token_and_maps_claims() {
        let t = mint_hs256(
            SECRET.as_bytes(),
            &json!({"store_id": "north", "sub": "u1", "exp": now() + 60, "iss": "iss-1"}),
        )
        .unwrap();
        let id = validator().await.validate(&t, "u").await.unwrap();
        assert_eq!(&*id.tenant, "north");
        assert_eq!(
            id.settings,
            vec![
                ("app.current_store_id".into(), "north".into()),
                ("app.user_id".into(), "u1".into())
            ]
        );
    }

    /// The audit record of a login takes the kid from the verified token's header (the login no
    /// longer decodes the header a second time), as the unverified reading would.
    #[tokio::test]
    async fn verify_hands_back_the_headers_kid() {
        let claims = json!({"store_id": "north", "sub": "u1", "exp": now() + 60, "iss": "iss-1"});
        let v = validator().await;
        for kid in [Some("key-7"), None] {
            let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
            header.kid = kid.map(str::to_string);
            let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
            let t = jsonwebtoken::encode(&header, &claims, &key).unwrap();
            let verified = v.verify(&t, "u").await.unwrap();
            assert_eq!(verified.kid.as_deref(), kid);
            assert_eq!(verified.kid, Validator::meta(&t).kid);
            assert_eq!(&*verified.identity.tenant, "north");
        }
    }

    #[tokio::test]
    async fn reserved_role_names_are_refused() {
        let v = validator_with(
            "role_claim = \"db_role\"\nrole_allow = [\"tenant_north\", \"none\", \"public\"]",
        )
        .await;
        for (role, ok) in [("tenant_north", true), ("none", false), ("public", false)] {
            let t = mint_hs256(
                SECRET.as_bytes(),
                &json!({"store_id": "north", "sub": "u1", "exp": now() + 60, "iss": "iss-1", "db_role": role}),
            )
            .unwrap();
            match v.validate(&t, "u").await {
                Ok(id) => assert!(ok, "{role} accepted as {:?}", id.role),
                Err(e) => assert!(
                    !ok && matches!(e, AuthError::RoleNotAllowed(_)),
                    "{role}: {e}"
                ),
            }
        }
    }

    #[tokio::test]
    async fn refuses_bad_tokens_with_reasons() {
        let v = validator().await;
        let good = json!({"store_id": "north", "sub": "u1", "exp": now() + 60, "iss": "iss-1"});
        let mint = |c: &Value| mint_hs256(SECRET.as_bytes(), c).unwrap();
        let mut expired = good.clone();
        expired["exp"] = json!(now() - 10);
        assert_eq!(
            v.validate(&mint(&expired), "u").await,
            Err(AuthError::Expired)
        );
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            v.validate(&mint(&no_exp), "u").await,
            Err(AuthError::MissingClaim("exp".into()))
        );
        let mut no_tenant = good.clone();
        no_tenant.as_object_mut().unwrap().remove("store_id");
        assert_eq!(
            v.validate(&mint(&no_tenant), "u").await,
            Err(AuthError::MissingClaim("store_id".into()))
        );
        let mut bad_tenant = good.clone();
        bad_tenant["store_id"] = json!("x'; drop table");
        assert_eq!(
            v.validate(&mint(&bad_tenant), "u").await,
            Err(AuthError::BadClaim("store_id".into()))
        );
        let mut wrong_iss = good.clone();
        wrong_iss["iss"] = json!("other");
        assert_eq!(
            v.validate(&mint(&wrong_iss), "u").await,
            Err(AuthError::BadIssuer)
        );
        let mut nbf = good.clone();
        nbf["nbf"] = json!(now() + 3600);
        assert_eq!(
            v.validate(&mint(&nbf), "u").await,
            Err(AuthError::NotYetValid)
        );
        let other_key = mint_hs256(b"another-secret-another-secret-xx", &good).unwrap();
        assert_eq!(
            v.validate(&other_key, "u").await,
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            v.validate("not.a.jwt", "u").await,
            Err(AuthError::Malformed)
        );
        assert_eq!(v.validate("", "u").await, Err(AuthError::Empty));
        assert_eq!(
            v.validate(&"a".repeat(MAX_TOKEN_LEN + 1), "u").await,
            Err(AuthError::TooLarge)
        );
    }

    #[tokio::test]
    async fn refusals_say_whether_the_signature_verified() {
        let v = validator().await;
        let good = json!({"store_id": "north", "sub": "u1", "exp": now() + 60, "iss": "iss-1"});
        let mint = |c: &Value| mint_hs256(SECRET.as_bytes(), c).unwrap();
        let verified = |e: AuthError| Err(Refusal::verified(e));
        let unverified = |e: AuthError| Err(Refusal::unverified(e));
        let mut expired = good.clone();
        expired["exp"] = json!(now() - 10);
        assert_eq!(
            v.check(&mint(&expired), "u").await,
            verified(AuthError::Expired)
        );
        let mut nbf = good.clone();
        nbf["nbf"] = json!(now() + 3600);
        assert_eq!(
            v.check(&mint(&nbf), "u").await,
            verified(AuthError::NotYetValid)
        );
        let mut iss = good.clone();
        iss["iss"] = json!("other");
        assert_eq!(
            v.check(&mint(&iss), "u").await,
            verified(AuthError::BadIssuer)
        );
        let mut tenant = good.clone();
        tenant["store_id"] = json!("x y");
        assert_eq!(
            v.check(&mint(&tenant), "u").await,
            verified(AuthError::BadClaim("store_id".into()))
        );
        // the claims of an expired token signed with another key are never looked at
        let forged = mint_hs256(b"another-secret-another-secret-xx", &expired).unwrap();
        assert_eq!(
            v.check(&forged, "u").await,
            unverified(AuthError::BadSignature)
        );
        let hs384 = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS384),
            &good,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            v.check(&hs384, "u").await,
            unverified(AuthError::BadAlgorithm)
        );
        let mut bad_sig_b64 = mint(&good);
        bad_sig_b64.push('!');
        assert!(
            !v.check(&bad_sig_b64, "u")
                .await
                .unwrap_err()
                .signature_verified
        );
        assert_eq!(v.check("a.b", "u").await, unverified(AuthError::Malformed));
        assert_eq!(v.check(" ", "u").await, unverified(AuthError::Empty));
    }

    #[test]
    fn meta_reads_the_claimed_subject_without_verifying() {
        let forged =
            mint_hs256(b"whatever-secret-whatever-secret!", &json!({"sub": "bob"})).unwrap();
        assert_eq!(
            Validator::meta(&forged).claimed,
            Claimed::Subject("bob".into())
        );
        let anonymous = mint_hs256(b"whatever-secret-whatever-secret!", &json!({"x": 1})).unwrap();
        assert_eq!(Validator::meta(&anonymous).claimed, Claimed::NoSubject);
        for junk in ["", "not-a-token", "a.b.c", "e30.W10.x"] {
            assert_eq!(Validator::meta(junk).claimed, Claimed::Unreadable, "{junk}");
        }
    }

    /// A token that verified is kept by its text: a second login with it does not decode it
    /// again (the entry's claims are what it gets), yet its identity is built for that login's
    /// user, and its expiry still ends it.
    #[tokio::test]
    async fn a_verified_token_is_reused_for_its_claims_only() {
        let v = validator_with("user_claim = \"sub\"").await;
        let t = mint_hs256(
            SECRET.as_bytes(),
            &json!({"store_id": "north", "sub": "u1", "exp": now() + 2, "iss": "iss-1"}),
        )
        .unwrap();
        assert_eq!(&*v.validate(&t, "u1").await.unwrap().tenant, "north");
        assert_eq!(v.verified.len(), 1);
        // the user name is checked on every login, also from the kept claims
        assert_eq!(
            v.validate(&t, "u2").await,
            Err(AuthError::UserMismatch("sub".into()))
        );
        // the kept claims are what a second login reads (no second decoding): swap them
        let hit = v.verified.get(&t, now()).expect("kept");
        let swapped = Cached::new(
            hit.alg,
            hit.kid.clone(),
            std::sync::Arc::clone(&hit.key),
            json!({"store_id": "south", "sub": "u1", "exp": now() + 2}),
        )
        .unwrap();
        v.verified.insert(&t, swapped, now());
        assert_eq!(&*v.validate(&t, "u1").await.unwrap().tenant, "south");
        // …and a token is never reused past its exp (leeway 0 here)
        tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
        assert_eq!(v.validate(&t, "u1").await, Err(AuthError::Expired));
        // a bad token is never kept
        let forged = format!("{}x", &t[..t.len() - 1]);
        assert!(v.validate(&forged, "u1").await.is_err());
        assert!(v.verified.get(&forged, now()).is_none());
    }

    /// A token kept under one validator is unknown to the next: a reload starts empty.
    #[tokio::test]
    async fn tokens_are_kept_per_validator() {
        let a = validator().await;
        let t = mint_hs256(
            SECRET.as_bytes(),
            &json!({"store_id": "north", "sub": "u1", "exp": now() + 60, "iss": "iss-1"}),
        )
        .unwrap();
        a.validate(&t, "u").await.unwrap();
        a.validate(&t, "u").await.unwrap();
        assert_eq!(a.verified.len(), 1);
        let b = validator().await;
        assert!(b.verified.get(&t, now()).is_none());
    }

    #[tokio::test]
    async fn alg_none_is_refused() {
        // header {"alg":"none","typ":"JWT"}, no signature
        let claims = json!({"store_id": "north", "exp": now() + 60, "iss": "iss-1"}).to_string();
        use base64_like::encode;
        let t = format!(
            "{}.{}.",
            encode(br#"{"alg":"none","typ":"JWT"}"#),
            encode(claims.as_bytes())
        );
        assert!(validator().await.validate(&t, "u").await.is_err());
    }

    /// Minimal base64url (no padding) for building hostile tokens by hand.
    mod base64_like {
        pub fn encode(input: &[u8]) -> String {
            const T: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in input.chunks(3) {
                let b = [
                    chunk[0],
                    *chunk.get(1).unwrap_or(&0),
                    *chunk.get(2).unwrap_or(&0),
                ];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..=chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out
        }
    }
}
