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
    /// From the StartupMessage (survive RESET ALL, as in Postgres).
    startup: Vec<(String, String)>,
    /// From the client's own session-level SETs, in order.
    runtime: Vec<(String, String)>,
    /// Changes made by units still in flight: (unit number, change).
    pending: Vec<(u64, Change)>,
    /// The SQL that puts a connection holding defaults into this client's state (shared with
    /// the connections that hold it, see `pool::HeldSettings`).
    replay: Arc<str>,
}

#[derive(Debug, Clone)]
enum Change {
    Set(SettingChange),
    ResetAll,
}

impl Settings {
    /// Settings requested at login (directly or via `options=-c name=value`), excluding protected
    /// ones (refused at login before this) and names that are not plain identifiers.
    pub fn from_startup(requested: &[(String, String)], protected: &ProtectedSet) -> Settings {
        let mut s = Settings::default();
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
            let sql = crate::guard::set_sql::set_statement(&lower, value);
            upsert(&mut s.startup, lower, sql);
        }
        s.startup.shrink_to_fit(); // kept for the whole session
        s.rebuild();
        s
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
        self.startup.is_empty() && self.runtime.is_empty()
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
        self.replay = self
            .startup
            .iter()
            .filter(|(n, _)| !self.runtime.iter().any(|(r, _)| r == n))
            .chain(self.runtime.iter())
            .map(|(_, sql)| sql.as_str())
            .collect::<Vec<_>>()
            // a newline before each `;`: a `-- comment` at the end of a client's SET text ends
            // there instead of swallowing the SETs after it
            .join("\n; ")
            .into();
    }
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
        let s = Settings::from_startup(&req, &ProtectedSet::new(&["app.*".into()]));
        assert_eq!(s.replay_sql(), "SET \"application_name\" TO 'it''s'");
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
