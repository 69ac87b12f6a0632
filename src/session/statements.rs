//! A client's prepared statements and their names on the server.
//!
//! Client statement names are private to the client. On the server every statement is named
//! `rg_<hash of tenant, text and parameter types>` (keyed per process, so names cannot be
//! predicted), so identical statements are shared between clients of one tenant and re-prepared
//! on whichever connection serves the next transaction; tenants never share one.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use bytes::Bytes;

use crate::guard::Analysis;

#[derive(Debug, Clone)]
pub struct Prepared {
    pub server_name: Arc<str>,
    pub sql: Arc<str>,
    pub param_types: Bytes,
    pub analysis: Arc<Analysis>,
    /// The pool's plan clock when the client prepared it (see `Pool::plan_tick`).
    pub stamp: u64,
    /// The guard generation `analysis` came from (see `Shared::guard_epoch`).
    pub guard_epoch: u64,
}

/// Most named statements one client may hold (Postgres has no limit; this bounds memory).
pub const MAX_STATEMENTS: usize = 10_000;
/// Most statement text (bytes) one client's named statements may hold in the proxy.
pub const MAX_STATEMENT_BYTES: usize = 64 << 20;

#[derive(Debug, Default)]
pub struct Statements {
    named: HashMap<String, Arc<Prepared>>,
    /// The client's unnamed statement and its Parse sequence number.
    pub unnamed: Option<(Arc<Prepared>, u64)>,
    pub parse_seq: u64,
    /// Text bytes of the named statements.
    bytes: usize,
}

impl Statements {
    /// Nothing was ever prepared (a resting client keeps no room for the table then).
    pub fn is_pristine(&self) -> bool {
        self.named.is_empty() && self.unnamed.is_none() && self.parse_seq == 0 && self.bytes == 0
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Prepared>> {
        if name.is_empty() {
            self.unnamed.as_ref().map(|(p, _)| p)
        } else {
            self.named.get(name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn insert(&mut self, name: &str, p: Arc<Prepared>) -> u64 {
        self.parse_seq += 1;
        if name.is_empty() {
            self.unnamed = Some((p, self.parse_seq));
        } else {
            self.bytes += p.sql.len();
            if let Some(old) = self.named.insert(name.to_string(), p) {
                self.bytes = self.bytes.saturating_sub(old.sql.len());
            }
        }
        self.parse_seq
    }

    /// The client's unnamed statement when a Parse of `sql` with `param_types` repeats it
    /// (drivers re-Parse it for every execution) and the guard that classified it is still the
    /// one in force: its analysis stands, and it passed the `rlsgate.reauth` check when it was
    /// first parsed (such statements are never kept here).
    pub fn unnamed_again(
        &self,
        sql: &str,
        param_types: &[u8],
        guard_epoch: u64,
    ) -> Option<&Arc<Prepared>> {
        let (p, _) = self.unnamed.as_ref()?;
        (p.guard_epoch == guard_epoch && *p.sql == *sql && p.param_types[..] == *param_types)
            .then_some(p)
    }

    /// The client Parsed its unnamed statement again (see [`Statements::unnamed_again`]): the
    /// statement kept is refreshed (stamp, Parse sequence) in place, or in a copy while a unit
    /// still holds it, instead of a new one being built. Returns the Parse's sequence number;
    /// `None` when there is no unnamed statement.
    pub fn refresh_unnamed(&mut self, stamp: u64) -> Option<u64> {
        let (p, seq) = self.unnamed.as_mut()?;
        Arc::make_mut(p).stamp = stamp;
        self.parse_seq += 1;
        *seq = self.parse_seq;
        Some(self.parse_seq)
    }

    pub fn remove(&mut self, name: &str) {
        if name.is_empty() {
            self.unnamed = None;
        } else if let Some(old) = self.named.remove(name) {
            self.bytes = self.bytes.saturating_sub(old.sql.len());
        }
    }

    /// Whether one more named statement of `len` bytes fits the client's limits.
    pub fn has_room(&self, len: usize) -> bool {
        self.named.len() < MAX_STATEMENTS && self.bytes.saturating_add(len) <= MAX_STATEMENT_BYTES
    }

    /// DISCARD ALL: forget every statement (the sequence keeps counting, so old server-side
    /// unnamed statements never match a new one).
    pub fn forget_all(&mut self) {
        self.named.clear();
        self.bytes = 0;
        self.unnamed = None;
    }
}

/// The server-side name recorded for the client's unnamed statement, which is forwarded as the
/// server's unnamed statement and so never named there: one shared empty name, no allocation.
pub fn unnamed() -> Arc<str> {
    static UNNAMED: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    Arc::clone(&UNNAMED)
}

/// A Parse's parameter-type list, kept with the statement (no allocation for the common "none").
pub fn param_types(raw: &[u8]) -> bytes::Bytes {
    if raw == [0, 0] {
        bytes::Bytes::from_static(&[0, 0])
    } else {
        bytes::Bytes::copy_from_slice(raw)
    }
}

/// The server-side name for a statement: per tenant, so that no tenant can ever bind, describe
/// or replace a statement another tenant prepared (SQL-level access to the `rg_` namespace is
/// denied by the guard as well).
pub fn server_name(
    hasher: &impl BuildHasher,
    tenant: &str,
    sql: &str,
    param_types: &[u8],
) -> Arc<str> {
    let h = hasher.hash_one((tenant, sql, param_types));
    Arc::from(format!("rg_{h:016x}"))
}
