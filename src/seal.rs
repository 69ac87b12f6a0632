//! Hardened ("signed") mode: rlsgate proves to the database that it set the tenant.
//!
//! With `[context] mode = "signed"`, before a server connection serves a tenant it has not
//! served since its sequence state was last cleared, rlsgate runs
//! `SELECT rlsgate.enter($1, $2, $3, $4, $5)` (sql/hardened.sql) in a transaction of its own,
//! with bind parameters only: the tenant, an expiry, a nonce, the key id, and
//! HMAC-SHA256(key, `rlsgate-seal-v1:<tenant>:<backend pid>:<expiry>:<nonce>`). The function
//! verifies it with a key the application role cannot read and seals the backend for that
//! tenant; policies written with `rlsgate.tenant()` refuse any tenant setting the seal does not
//! match. So a client that gets a forged setting past the guard reads and writes nothing.
//!
//! Which connection is sealed for which tenant is tracked per server connection
//! ([`crate::pool::ServerConn::sealed`]): the seal costs one function call per tenant switch,
//! not per transaction.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::hmac;
use bytes::BytesMut;

use crate::protocol::ProtocolError;
use crate::session::OwnStatement;

/// How long a seal's MAC is valid (the database also refuses one more than 600 s ahead).
const SEAL_TTL_SECS: u64 = 60;

/// The statement rlsgate binds per seal.
pub const ENTER_SQL: &str = "SELECT rlsgate.enter($1, $2, $3, $4, $5)";

/// One signing key: its id as the database names it (`rlsgate.key_id`) and the HMAC key.
struct SealKey {
    id: String,
    key: hmac::Key,
}

impl SealKey {
    fn new(secret: &str) -> SealKey {
        SealKey {
            id: key_id(secret),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        }
    }
}

/// `"k"` and the first 16 hex digits of sha256(key): public, names the key in the database.
pub fn key_id(secret: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
    let mut id = String::from("k");
    for b in &digest.as_ref()[..8] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// The signing keys and the prepared `rlsgate.enter` statement, shared by all sessions.
pub struct Sealer {
    /// The current key first, then the previous one (key rotation).
    keys: Vec<SealKey>,
    /// `BEGIN READ WRITE`, `rlsgate.enter`, `COMMIT`.
    begin: OwnStatement,
    enter: OwnStatement,
    commit: OwnStatement,
    /// Nonces strictly increase per backend (the database refuses one it has seen): one counter
    /// for the process, started at the clock in microseconds, so a restarted rlsgate starts above
    /// whatever an earlier run sent.
    nonce: AtomicU64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("keys", &self.key_ids())
            .finish_non_exhaustive()
    }
}

impl Sealer {
    pub fn new(
        current: &str,
        previous: Option<&str>,
        hasher: &impl BuildHasher,
    ) -> Result<Sealer, ProtocolError> {
        let keys = std::iter::once(current)
            .chain(previous)
            .map(SealKey::new)
            .collect();
        Ok(Sealer {
            keys,
            begin: OwnStatement::prepared(hasher, "BEGIN READ WRITE")?,
            enter: OwnStatement::prepared(hasher, ENTER_SQL)?,
            commit: OwnStatement::prepared(hasher, "COMMIT")?,
            nonce: AtomicU64::new(unix_micros()),
        })
    }

    /// The sealer `[context]` asks for: `None` in plain mode.
    pub fn from_config(
        context: &crate::config::ContextConfig,
        hasher: &impl BuildHasher,
    ) -> Result<Option<Sealer>, ProtocolError> {
        match (context.mode, &context.signing_key) {
            (crate::config::ContextMode::Signed, Some(key)) => Ok(Some(Sealer::new(
                key,
                context.previous_signing_key.as_deref(),
                hasher,
            )?)),
            _ => Ok(None),
        }
    }

    /// The key ids, current first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Asks whether the database has each key, in [`Sealer::key_ids`]' order (one boolean column
    /// per key). Ids are `k` + hex digits: safe as literals.
    pub fn probe_sql(&self) -> String {
        let checks: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("rlsgate.key_installed('{}')", k.id))
            .collect();
        format!("SELECT {}", checks.join(", "))
    }

    /// The first key the database has, from the answer to [`Sealer::probe_sql`].
    pub fn pick_key(&self, installed: &[bool]) -> Result<u8, String> {
        match installed.iter().position(|&yes| yes) {
            Some(0) => Ok(0),
            Some(i) => {
                tracing::warn!(
                    current = %self.keys[0].id,
                    using = %self.keys[i].id,
                    "the database does not know context.signing_key yet: sealing with context.previous_signing_key; install the new key ({})",
                    self.install_hint()
                );
                u8::try_from(i).map_err(|e| e.to_string())
            }
            None => Err(format!(
                "signed context: the database knows none of the signing keys ({}); install the key: {}",
                self.key_ids().join(", "),
                self.install_hint()
            )),
        }
    }

    /// What the operator runs to install the current key.
    pub fn install_hint(&self) -> String {
        "as the database owner or rlsgate_owner, run `psql -v key=\"$KEY\" -c \"SELECT rlsgate.install_key(:'key')\"` with KEY set to the value of context.signing_key (psql >= 16; older psql: echo \"SELECT rlsgate.install_key(:'key')\" | psql -v key=\"$KEY\")".to_string()
    }

    /// The statements a seal binds (each Parsed once per connection, like the context).
    pub fn statements(&self) -> [&OwnStatement; 3] {
        [&self.begin, &self.enter, &self.commit]
    }

    /// Bind + Execute of `BEGIN READ WRITE`, of `rlsgate.enter` sealing backend `pid` for
    /// `tenant` with key `key` (an index into [`Sealer::key_ids`]), and of `COMMIT` (no Sync).
    pub fn write_seal(
        &self,
        tenant: &str,
        pid: i32,
        key: u8,
        out: &mut BytesMut,
    ) -> Result<(), ProtocolError> {
        let key = self
            .keys
            .get(usize::from(key))
            .ok_or(ProtocolError::Malformed("seal key"))?;
        let expires = unix_micros() / 1_000_000 + SEAL_TTL_SECS;
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed);
        let mac = seal_mac(&key.key, tenant, pid, expires, nonce);
        let expires = expires.to_string();
        let nonce = nonce.to_string();
        out.extend_from_slice(&self.begin.run);
        self.enter
            .write_run(&[tenant, &expires, &nonce, &key.id, &mac], out)?;
        out.extend_from_slice(&self.commit.run);
        Ok(())
    }
}

/// The message of `rlsgate.unsealed()` (sql/hardened.sql), raised by `rlsgate.tenant()`.
const UNSEALED_MESSAGE: &[u8] = b"rlsgate: the tenant context of this connection is not sealed";

/// Whether an ErrorResponse body is `rlsgate.tenant()` refusing an unsealed connection.
/// Also the error of `currval` after DISCARD SEQUENCES (or on a never-sealed backend).
pub fn is_unsealed_error(body: &[u8]) -> bool {
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    has(UNSEALED_MESSAGE) || has(UNDEFINED_SEAL_MESSAGE)
}

/// PostgreSQL's message for `currval('rlsgate.seal')` with no value in this session.
const UNDEFINED_SEAL_MESSAGE: &[u8] =
    b"currval of sequence \"seal\" is not yet defined in this session";

/// The MAC as `bytea` text input (`\x` + hex).
fn seal_mac(key: &hmac::Key, tenant: &str, pid: i32, expires: u64, nonce: u64) -> String {
    let message = format!("rlsgate-seal-v1:{tenant}:{pid}:{expires}:{nonce}");
    let tag = hmac::sign(key, message.as_bytes());
    let mut text = String::with_capacity(2 + 64);
    text.push_str("\\x");
    for b in tag.as_ref() {
        text.push_str(&format!("{b:02x}"));
    }
    text
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef-test-key";

    /// The same figures as sql/hardened.sql computes (checked against Python's hmac module).
    #[test]
    fn key_id_and_mac_match_the_database() {
        assert_eq!(key_id(KEY), "k7f6ee6c0e603cc60");
        let key = hmac::Key::new(hmac::HMAC_SHA256, KEY.as_bytes());
        let tag = hmac::sign(&key, b"hello");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "efc47bca550f3d5e2af4b7875e3b30aefa19d4345695c072c429577351990863"
        );
        let mac = seal_mac(&key, "north", 42, 100, 7);
        assert!(mac.starts_with("\\x") && mac.len() == 66, "{mac}");
        assert_ne!(mac, seal_mac(&key, "north", 43, 100, 7), "bound to the pid");
        assert_ne!(
            mac,
            seal_mac(&key, "north", 42, 100, 8),
            "bound to the nonce"
        );
    }

    #[test]
    fn the_current_key_wins_and_none_is_an_error() {
        let hasher = std::collections::hash_map::RandomState::new();
        let other = "another key, also at least 32 bytes long";
        let s = Sealer::new(KEY, Some(other), &hasher).unwrap();
        assert_eq!(s.key_ids(), [key_id(KEY), key_id(other)]);
        assert_eq!(s.pick_key(&[true, true]), Ok(0));
        assert_eq!(s.pick_key(&[false, true]), Ok(1));
        let err = s.pick_key(&[false, false]).unwrap_err();
        assert!(err.contains("install_key"), "{err}");
        assert_eq!(
            s.probe_sql(),
            format!(
                "SELECT rlsgate.key_installed('{}'), rlsgate.key_installed('{}')",
                key_id(KEY),
                key_id(other)
            )
        );
    }

    #[test]
    fn nonces_increase() {
        let hasher = std::collections::hash_map::RandomState::new();
        let s = Sealer::new(KEY, None, &hasher).unwrap();
        let mut a = BytesMut::new();
        let mut b = BytesMut::new();
        s.write_seal("north", 1, 0, &mut a).unwrap();
        s.write_seal("north", 1, 0, &mut b).unwrap();
        assert_ne!(a, b);
        assert!(s.write_seal("north", 1, 1, &mut a).is_err(), "no such key");
    }
}
