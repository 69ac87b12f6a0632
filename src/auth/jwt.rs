//! Token validation with `jsonwebtoken`.

use std::str::FromStr;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::Value;

use super::Identity;
use super::claims::{lookup, render_claim, valid_tenant};
use crate::config::AuthConfig;
use crate::error::{ClientError, UserFacing, sqlstate};

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
    #[error("token was rejected")]
    Other,
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
}

/// Validates tokens against the configured key, algorithms and claims.
pub struct Validator {
    key: DecodingKey,
    validation: Validation,
    tenant_claim: String,
    /// `(guc, claim path)` pairs from `[context]`.
    context: Vec<(String, String)>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Validator {
    pub fn new(
        auth: &AuthConfig,
        context: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, KeyError> {
        let algorithms = auth
            .algorithms
            .iter()
            .map(|a| Algorithm::from_str(a).map_err(|_| KeyError::UnknownAlgorithm(a.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let family = algorithms[0].family();
        if algorithms.iter().any(|a| a.family() != family) {
            return Err(KeyError::MixedFamilies(auth.algorithms.clone()));
        }
        let key = match family {
            AlgorithmFamily::Hmac => {
                let secret = auth.hs_secret.as_deref().ok_or(KeyError::MissingSecret)?;
                if secret.len() < 32 {
                    return Err(KeyError::WeakSecret);
                }
                DecodingKey::from_secret(secret.as_bytes())
            }
            other => {
                let path = auth
                    .public_key_pem
                    .as_ref()
                    .ok_or(KeyError::MissingPublicKey)?;
                let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                let (name, parsed) = match other {
                    AlgorithmFamily::Rsa => ("RSA", DecodingKey::from_rsa_pem(&pem)),
                    AlgorithmFamily::Ec => ("EC", DecodingKey::from_ec_pem(&pem)),
                    AlgorithmFamily::Ed => ("EdDSA", DecodingKey::from_ed_pem(&pem)),
                    AlgorithmFamily::Hmac => ("HMAC", Err(ErrorKind::InvalidKeyFormat.into())),
                };
                parsed.map_err(|e| KeyError::BadKey {
                    family: name,
                    reason: e.to_string(),
                })?
            }
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
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
        Ok(Validator {
            key,
            validation,
            tenant_claim: auth.tenant_claim.clone(),
            context: context
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// Check a token and build the identity it proves.
    pub fn validate(&self, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Empty);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TooLarge);
        }
        let data = jsonwebtoken::decode::<Value>(token, &self.key, &self.validation)
            .map_err(|e| map_error(e.kind()))?;
        let claims = data.claims;
        let tenant = match lookup(&claims, &self.tenant_claim) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(_) => return Err(AuthError::BadClaim(self.tenant_claim.clone())),
            None => return Err(AuthError::MissingClaim(self.tenant_claim.clone())),
        };
        if !valid_tenant(&tenant) {
            return Err(AuthError::BadClaim(self.tenant_claim.clone()));
        }
        let mut settings = Vec::with_capacity(self.context.len());
        for (guc, path) in &self.context {
            let value = if *path == self.tenant_claim {
                tenant.clone()
            } else {
                let Some(v) = lookup(&claims, path).and_then(render_claim) else {
                    return Err(AuthError::MissingClaim(path.clone()));
                };
                if v.len() > MAX_SETTING_LEN || v.contains('\0') {
                    return Err(AuthError::BadClaim(path.clone()));
                }
                v
            };
            settings.push((guc.clone(), value));
        }
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(AuthError::MissingClaim("exp".into()))?;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Identity {
            tenant,
            subject,
            settings,
            expires_at,
        })
    }
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
    use std::collections::BTreeMap;
    use std::time::Duration;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn validator() -> Validator {
        let auth = AuthConfig {
            algorithms: vec!["HS256".into()],
            hs_secret: Some(SECRET.into()),
            public_key_pem: None,
            issuer: Some("iss-1".into()),
            audience: None,
            leeway: Duration::from_secs(0),
            tenant_claim: "store_id".into(),
        };
        let mut ctx = BTreeMap::new();
        ctx.insert("app.current_store_id".to_string(), "store_id".to_string());
        ctx.insert("app.user_id".to_string(), "sub".to_string());
        Validator::new(&auth, &ctx).unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn accepts_a_good_token_and_maps_claims() {
        let t = mint_hs256(
            SECRET.as_bytes(),
            &json!({"store_id": "north", "sub": "u1", "exp": now() + 60, "iss": "iss-1"}),
        )
        .unwrap();
        let id = validator().validate(&t).unwrap();
        assert_eq!(id.tenant, "north");
        assert_eq!(
            id.settings,
            vec![
                ("app.current_store_id".into(), "north".into()),
                ("app.user_id".into(), "u1".into())
            ]
        );
    }

    #[test]
    fn refuses_bad_tokens_with_reasons() {
        let v = validator();
        let good = json!({"store_id": "north", "sub": "u1", "exp": now() + 60, "iss": "iss-1"});
        let mint = |c: &Value| mint_hs256(SECRET.as_bytes(), c).unwrap();
        let mut expired = good.clone();
        expired["exp"] = json!(now() - 10);
        assert_eq!(v.validate(&mint(&expired)), Err(AuthError::Expired));
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            v.validate(&mint(&no_exp)),
            Err(AuthError::MissingClaim("exp".into()))
        );
        let mut no_tenant = good.clone();
        no_tenant.as_object_mut().unwrap().remove("store_id");
        assert_eq!(
            v.validate(&mint(&no_tenant)),
            Err(AuthError::MissingClaim("store_id".into()))
        );
        let mut bad_tenant = good.clone();
        bad_tenant["store_id"] = json!("x'; drop table");
        assert_eq!(
            v.validate(&mint(&bad_tenant)),
            Err(AuthError::BadClaim("store_id".into()))
        );
        let mut wrong_iss = good.clone();
        wrong_iss["iss"] = json!("other");
        assert_eq!(v.validate(&mint(&wrong_iss)), Err(AuthError::BadIssuer));
        let mut nbf = good.clone();
        nbf["nbf"] = json!(now() + 3600);
        assert_eq!(v.validate(&mint(&nbf)), Err(AuthError::NotYetValid));
        let other_key = mint_hs256(b"another-secret-another-secret-xx", &good).unwrap();
        assert_eq!(v.validate(&other_key), Err(AuthError::BadSignature));
        assert_eq!(v.validate("not.a.jwt"), Err(AuthError::Malformed));
        assert_eq!(v.validate(""), Err(AuthError::Empty));
        assert_eq!(
            v.validate(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(AuthError::TooLarge)
        );
    }

    #[test]
    fn alg_none_is_refused() {
        // header {"alg":"none","typ":"JWT"}, no signature
        let claims = json!({"store_id": "north", "exp": now() + 60, "iss": "iss-1"}).to_string();
        use base64_like::encode;
        let t = format!(
            "{}.{}.",
            encode(br#"{"alg":"none","typ":"JWT"}"#),
            encode(claims.as_bytes())
        );
        assert!(validator().validate(&t).is_err());
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
