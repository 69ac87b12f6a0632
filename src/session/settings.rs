//! A client's session settings: its startup parameters and the session-level `SET`s it ran.
//! They are replayed (`RESET ALL; SET …`) on whichever server connection serves the client when
//! that connection holds someone else's settings; the replay is pipelined ahead of the client's
//! messages, so it costs no round trip.

use std::sync::Arc;

use crate::guard::SettingChange;
use crate::guard::protected::ProtectedSet;

/// Startup parameters that are not settings, or that rlsgate fixes itself.
const NOT_SETTINGS: &[&str] = &[
    "user",
    "database",
    "replication",
    "options",
    "client_encoding",
];

#[derive(Debug, Default)]
pub struct Settings {
    /// From the StartupMessage (survive RESET ALL, as in Postgres); shared by the clients that
    /// asked for the same (see [`StartupCache`]).
    startup: Arc<Startup>,
    /// From the client's own session-level SETs, in order.
    runtime: Vec<(String, String)>,
    /// Changes made by units still in flight: (unit number, change).
    pending: Vec<(u64, Change)>,
    /// The SQL that puts a connection holding defaults into this client's state (shared with
    /// the connections that hold it, see `pool::HeldSettings`).
    replay: Arc<str>,
}

/// The settings of a StartupMessage: `(name, SET statement)` in order, and their replay text.
#[derive(Debug, Default)]
pub struct Startup {
    list: Vec<(String, String)>,
    replay: Arc<str>,
}

/// Distinct startup settings kept for sharing.
const MAX_SHARED_STARTUPS: usize = 1024;

/// The startup settings clients asked for, one copy per distinct request (a pool's clients all
/// ask for the same): no statement is formatted and nothing is allocated for them per login.
/// Keyed by the accepted names and values as sent; bounded (past [`MAX_SHARED_STARTUPS`]
/// requests, new ones get their own copy).
#[derive(Default)]
pub struct StartupCache(
    std::sync::Mutex<
        std::collections::HashMap<Box<str>, Arc<Startup>, foldhash::fast::RandomState>,
    >,
);

impl StartupCache {
    fn get_or_build(&self, key: &str, build: impl FnOnce() -> Startup) -> Arc<Startup> {
        if let Some(hit) = self.0.lock().ok().and_then(|m| m.get(key).cloned()) {
            return hit;
        }
        let built = Arc::new(build());
        if let Ok(mut m) = self.0.lock()
            && m.len() < MAX_SHARED_STARTUPS
        {
            m.insert(Box::from(key), Arc::clone(&built));
        }
        built
    }
}

#[derive(Debug, Clone)]
enum Change {
    Set(SettingChange),
    ResetAll,
}

impl Settings {
    /// Settings requested at login (directly or via `options=-c name=value`), excluding protected
    /// ones (refused at login before this) and names that are not plain identifiers.
    pub fn from_startup(
        requested: &[(String, String)],
        protected: &ProtectedSet,
        cache: &StartupCache,
    ) -> Settings {
        // The key: the accepted names (lower case) and values, NUL-separated (a startup value
        // holds no NUL).
        let mut key = String::new();
        let mut accepted = Vec::new();
        for (name, value) in requested {
            let lower = name.to_ascii_lowercase();
            if NOT_SETTINGS.contains(&lower.as_str())
                || protected.is_protected(&lower)
                || lower.is_empty()
                || !lower
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            {
                continue;
            }
            key.push_str(&lower);
            key.push('\0');
            key.push_str(value);
            key.push('\0');
            accepted.push((lower, value));
        }
        if accepted.is_empty() {
            return Settings::default();
        }
        let startup = cache.get_or_build(&key, || {
            let mut list = Vec::new();
            for (lower, value) in accepted {
                let sql = crate::guard::set_sql::set_statement(&lower, value);
                upsert(&mut list, lower, sql);
            }
            list.shrink_to_fit();
            let replay = join(list.iter().map(|(_, sql)| sql.as_str()));
            Startup { list, replay }
        });
        Settings {
            replay: Arc::clone(&startup.replay),
            startup,
            runtime: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Startup values to report to the client at login instead of the upstream's.
    pub fn startup_value<'a>(
        &self,
        requested: &'a [(String, String)],
        name: &str,
    ) -> Option<&'a str> {
        requested
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.startup.list.is_empty() && self.runtime.is_empty()
    }

    /// The SQL that puts a connection holding defaults into this client's state.
    pub fn replay_sql(&self) -> &str {
        &self.replay
    }

    /// What a connection must hold for this client (`None`: the upstream defaults).
    pub fn wanted(&self) -> Option<&Arc<str>> {
        (!self.is_empty()).then_some(&self.replay)
    }

    /// A change made by unit `unit`; it counts once that unit's transaction commits.
    /// No change waits for its unit's end.
    pub fn settled(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn stage(&mut self, unit: u64, change: &SettingChange) {
        self.pending.push((unit, Change::Set(change.clone())));
    }

    pub fn stage_reset_all(&mut self, unit: u64) {
        self.pending.push((unit, Change::ResetAll));
    }

    /// Units up to `unit` ended in a committed state: apply their changes. Returns `None` when
    /// nothing changed, else whether a RESET ALL was among the changes.
    pub fn commit_through(&mut self, unit: u64) -> Option<bool> {
        let mut changed = false;
        let mut reset = false;
        let pending = std::mem::take(&mut self.pending);
        for (u, change) in pending {
            if u > unit {
                self.pending.push((u, change));
                continue;
            }
            changed = true;
            match change {
                Change::Set(SettingChange::Set { name, sql }) => {
                    upsert(&mut self.runtime, name, sql)
                }
                Change::Set(SettingChange::Reset { name }) => {
                    self.runtime.retain(|(n, _)| *n != name)
                }
                Change::ResetAll => {
                    reset = true;
                    self.runtime.clear();
                }
            }
        }
        if !changed {
            return None;
        }
        self.rebuild();
        Some(reset)
    }

    /// Changes staged under the stand-in unit `from` now belong to unit `to`.
    pub fn retag(&mut self, from: u64, to: u64) {
        for (u, _) in &mut self.pending {
            if *u == from {
                *u = to;
            }
        }
    }

    /// Units up to `unit` were rolled back: forget their changes.
    /// Units up to `unit` ended failed or rolled back: forget their changes. Returns whether
    /// there were any.
    pub fn discard_through(&mut self, unit: u64) -> bool {
        let before = self.pending.len();
        self.pending.retain(|(u, _)| *u > unit);
        self.pending.len() != before
    }

    fn rebuild(&mut self) {
        if self.runtime.is_empty() {
            self.replay = Arc::clone(&self.startup.replay);
            return;
        }
        self.replay = join(
            self.startup
                .list
                .iter()
                .filter(|(n, _)| !self.runtime.iter().any(|(r, _)| r == n))
                .chain(self.runtime.iter())
                .map(|(_, sql)| sql.as_str()),
        );
    }
}

/// SET statements as one replay text. A newline before each `;`: a `-- comment` at the end of
/// a client's SET text ends there instead of swallowing the SETs after it.
fn join<'a>(statements: impl Iterator<Item = &'a str>) -> Arc<str> {
    statements.collect::<Vec<_>>().join("\n; ").into()
}

fn upsert(list: &mut Vec<(String, String)>, name: String, sql: String) {
    match list.iter_mut().find(|(n, _)| *n == name) {
        Some(entry) => entry.1 = sql,
        None => list.push((name, sql)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, sql: &str) -> SettingChange {
        SettingChange::Set {
            name: name.into(),
            sql: sql.into(),
        }
    }

    #[test]
    fn startup_settings_are_quoted_and_filtered() {
        let req = vec![
            ("user".to_string(), "u".to_string()),
            ("application_name".to_string(), "it's".to_string()),
            ("app.current_store_id".to_string(), "x".to_string()),
            ("bad name;".to_string(), "x".to_string()),
        ];
        let s = Settings::from_startup(
            &req,
            &ProtectedSet::new(&["app.*".into()]),
            &StartupCache::default(),
        );
        assert_eq!(s.replay_sql(), "SET \"application_name\" TO 'it''s'");
    }

    /// Clients that ask for the same startup settings share one copy (and the connections
    /// holding them compare by pointer); a client's own SET gives it its own replay text, and
    /// resetting it returns to the shared one.
    #[test]
    fn the_same_startup_settings_are_shared() {
        let cache = StartupCache::default();
        let protected = ProtectedSet::new(&["app.*".into()]);
        let req = |app: &str| {
            vec![
                ("user".to_string(), format!("user-{app}")),
                ("application_name".to_string(), app.to_string()),
                ("DateStyle".to_string(), "ISO".to_string()),
            ]
        };
        let a = Settings::from_startup(&req("pgbench"), &protected, &cache);
        let mut b = Settings::from_startup(&req("pgbench"), &protected, &cache);
        let c = Settings::from_startup(&req("psql"), &protected, &cache);
        assert!(Arc::ptr_eq(&a.startup, &b.startup));
        assert!(Arc::ptr_eq(a.wanted().unwrap(), b.wanted().unwrap()));
        assert!(!Arc::ptr_eq(&a.startup, &c.startup));
        assert_eq!(
            a.replay_sql(),
            "SET \"application_name\" TO 'pgbench'\n; SET \"datestyle\" TO 'ISO'"
        );
        assert_eq!(
            c.replay_sql(),
            "SET \"application_name\" TO 'psql'\n; SET \"datestyle\" TO 'ISO'"
        );
        b.stage(1, &set("datestyle", "SET DateStyle = 'German'"));
        b.commit_through(1);
        assert_eq!(
            b.replay_sql(),
            "SET \"application_name\" TO 'pgbench'\n; SET DateStyle = 'German'"
        );
        assert_eq!(
            a.replay_sql(),
            "SET \"application_name\" TO 'pgbench'\n; SET \"datestyle\" TO 'ISO'"
        );
        b.stage_reset_all(2);
        b.commit_through(2);
        assert!(Arc::ptr_eq(b.wanted().unwrap(), a.wanted().unwrap()));
        // no settings at all: nothing shared, nothing wanted
        let none = Settings::from_startup(&req("")[..1], &protected, &cache);
        assert_eq!(none.wanted(), None);
    }

    #[test]
    fn only_committed_changes_count() {
        let mut s = Settings::default();
        s.stage(1, &set("search_path", "SET search_path = a"));
        s.stage(2, &set("timezone", "SET TimeZone = 'UTC'"));
        assert_eq!(s.commit_through(1), Some(false));
        assert_eq!(s.replay_sql(), "SET search_path = a");
        s.discard_through(2);
        assert_eq!(s.commit_through(3), None);
        s.stage(
            4,
            &SettingChange::Reset {
                name: "search_path".into(),
            },
        );
        assert_eq!(s.commit_through(4), Some(false));
        assert!(s.is_empty());
        assert_eq!(s.wanted(), None);
    }

    #[test]
    fn a_trailing_comment_does_not_swallow_later_settings() {
        let mut s = Settings::default();
        for (name, sql) in [
            ("work_mem", "SET work_mem = '2MB' -- trailing"),
            ("statement_timeout", "SET statement_timeout = 4321"),
        ] {
            s.stage(
                1,
                &SettingChange::Set {
                    name: name.into(),
                    sql: sql.into(),
                },
            );
        }
        s.commit_through(1);
        assert_eq!(
            s.replay_sql(),
            "SET work_mem = '2MB' -- trailing\n; SET statement_timeout = 4321"
        );
    }
}
