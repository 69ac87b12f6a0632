//! Statement classification.
//!
//! Statements are parsed by libpg_query. The top-level statement decides transaction effects and
//! whether it may run in a transaction block; the *whole* tree is then searched generically (via
//! its serde form, so no node type can be missed) for anything that could change, reset or forge a
//! protected setting, or leave session state behind on a pooled connection.

use pg_query::NodeEnum;
use pg_query::protobuf::{RawStmt, TransactionStmtKind, VariableSetKind};

use super::GuardOptions;
use super::pinned::{CALL_POINTER, pinned_setting};
use super::search::{PinnedCall, Search};
use super::session_effects::{Deallocate, SettingChange, effects};
use crate::error::sqlstate;

/// How a statement moves the transaction state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxEffect {
    None,
    /// BEGIN / START TRANSACTION
    Begin,
    /// COMMIT / ROLLBACK / END / ABORT / PREPARE TRANSACTION
    End,
    /// COMMIT AND CHAIN and friends: the next state cannot be predicted from the text.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Byte range of the statement in the original text (without the trailing `;`).
    pub start: usize,
    pub end: usize,
    pub tx: TxEffect,
    /// VACUUM, CREATE DATABASE, CREATE INDEX CONCURRENTLY…: cannot run inside a transaction block.
    pub no_tx_block: bool,
    /// Behaves differently inside a transaction block (SAVEPOINT & co., SET LOCAL, SET
    /// TRANSACTION): transaction_wrap sends it unwrapped so the client sees what Postgres says.
    pub block_sensitive: bool,
    /// Transaction control or SET/RESET: may have to run before the transaction takes its first
    /// snapshot (`BEGIN ISOLATION LEVEL …`, `SET TRANSACTION …` after a bare BEGIN), so nothing
    /// rlsgate sends ahead of it may take one.
    pub before_snapshot: bool,
    /// A session-level setting change the proxy can replay on other connections.
    pub setting: Option<SettingChange>,
    /// `DEALLOCATE name` / `DEALLOCATE ALL` (`Some(None)`).
    pub deallocate: Option<Deallocate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Short, bounded rule name (for logs and metrics).
    pub rule: &'static str,
    /// What the client gets: 42501 for a refusal, 42601 for text the guard cannot parse.
    pub sqlstate: &'static str,
    /// What was blocked and why, for the client.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(Denial),
}

/// `RESET ALL` / `DISCARD ALL`: emulated by the session (run outside any transaction, never
/// where they could clear the tenant context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionReset {
    ResetAll,
    DiscardAll,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub verdict: Verdict,
    pub statements: Vec<Statement>,
    /// State that would outlive the transaction on a pooled connection (temp table, LISTEN, …).
    pub session_state: Option<&'static str>,
    /// A session-level `SET` (or `set_config(…, false)`) of an ordinary setting.
    pub session_set: bool,
    /// A session-level setting change the proxy cannot replay (SET … FROM CURRENT,
    /// set_config with computed arguments): the connection must be reset after the client.
    pub untracked_set: bool,
    /// Whether libpg_query could parse the text.
    pub parsed: bool,
    /// The text is exactly one `RESET ALL` or `DISCARD ALL`.
    pub reset: Option<SessionReset>,
    /// A `COPY … FROM STDIN` (the server reads copy data next, not further statements).
    pub copy_from_stdin: bool,
}

impl Analysis {
    pub fn is_denied(&self) -> bool {
        matches!(self.verdict, Verdict::Deny(_))
    }

    /// Combined transaction effect of all statements, for predicting the state after the text runs.
    pub fn tx_effect(&self) -> TxEffect {
        if !self.parsed {
            return TxEffect::Unknown;
        }
        let mut effect = TxEffect::None;
        for s in &self.statements {
            match s.tx {
                TxEffect::None => {}
                other if effect == TxEffect::None => effect = other,
                _ => effect = TxEffect::Unknown,
            }
        }
        effect
    }

    /// A single statement that must not be wrapped in a transaction (no context injection).
    pub fn runs_outside_transaction(&self) -> bool {
        self.statements.len() == 1 && self.statements[0].no_tx_block
    }

    /// Byte offsets after which a multi-statement text must be split so that the statements after a
    /// COMMIT/ROLLBACK run with the tenant context re-applied.
    pub fn split_points(&self) -> Vec<usize> {
        let n = self.statements.len();
        self.statements
            .iter()
            .enumerate()
            .filter(|(i, s)| *i + 1 < n && matches!(s.tx, TxEffect::End | TxEffect::Unknown))
            .map(|(i, _)| self.statements[i + 1].start)
            .collect()
    }
}

fn deny(rule: &'static str, message: String) -> Verdict {
    Verdict::Deny(Denial {
        rule,
        sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
        message,
    })
}

/// Texts longer than this are analysed on a stack of their own: a long text can hold a deep
/// tree (a chain of `+` nests one level per term), and decoding, walking and dropping it all
/// recurse. Short texts cannot be deep enough to matter.
const OWN_STACK_ABOVE: usize = 256;
/// Virtual size of that stack; only the pages a deep tree touches are ever committed.
const OWN_STACK_SIZE: usize = 256 << 20;

pub fn analyze(sql: &str, opts: &GuardOptions) -> Analysis {
    if sql.len() > OWN_STACK_ABOVE {
        stacker::grow(OWN_STACK_SIZE, || analyze_depth(sql, opts, 0))
    } else {
        analyze_depth(sql, opts, 0)
    }
}

pub(super) fn analyze_depth(sql: &str, opts: &GuardOptions, depth: u32) -> Analysis {
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => p,
        Err(e) => return unparsable(&e),
    };
    let mut analysis = Analysis {
        verdict: Verdict::Allow,
        statements: Vec::new(),
        session_state: None,
        session_set: false,
        untracked_set: false,
        parsed: true,
        reset: None,
        copy_from_stdin: false,
    };
    // per statement: the setting a pinned `set_config(name, …) FROM pg_settings` changes
    let mut pins: Vec<Option<String>> = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let (start, end) = stmt_range(raw, sql.len());
        let node = raw.stmt.as_ref().and_then(|n| n.node.as_ref());
        let (tx, no_tx_block) = node.map(top_level).unwrap_or((TxEffect::None, false));
        if let Some(NodeEnum::CopyStmt(c)) = node
            && c.is_from
            && c.filename.is_empty()
        {
            analysis.copy_from_stdin = true;
        }
        let text = sql.get(start..end).unwrap_or_default();
        let block_sensitive = match node {
            Some(NodeEnum::TransactionStmt(_)) => tx == TxEffect::None,
            Some(NodeEnum::VariableSetStmt(v)) => {
                v.is_local || v.kind == VariableSetKind::VarSetMulti as i32
            }
            _ => false,
        };
        let pinned = node.and_then(pinned_setting);
        let (setting, deallocate) = node
            .map(|n| effects(n, text, pinned.as_deref()))
            .unwrap_or((None, None));
        pins.push(pinned);
        let before_snapshot = matches!(
            node,
            Some(NodeEnum::TransactionStmt(_) | NodeEnum::VariableSetStmt(_)) | None
        );
        analysis.statements.push(Statement {
            start,
            end,
            tx,
            no_tx_block,
            block_sensitive,
            before_snapshot,
            setting,
            deallocate,
        });
    }
    // Each statement is walked on its own, so that the session-level settings the walk finds in
    // it can be matched against the one change (if any) the proxy tracks for it: one wrongly
    // tracked statement must never hide an untracked one elsewhere in the text.
    let mut search = Search::new(opts, depth);
    let mut untracked = false;
    for ((raw, statement), pin) in parsed
        .protobuf
        .stmts
        .iter()
        .zip(&analysis.statements)
        .zip(pins)
    {
        let tree = match serde_json::to_value(raw) {
            Ok(t) => t,
            Err(_) => {
                analysis.verdict = deny("unclassified", "statement could not be classified".into());
                return analysis;
            }
        };
        // The pinned name counts for the statement's one set_config call and no other.
        search.pinned = pin.and_then(|name| {
            tree.pointer(CALL_POINTER)
                .map(|call| PinnedCall::new(call, name))
        });
        let before = search.session_sets;
        search.walk(&tree);
        search.pinned = None;
        let found = search.session_sets - before;
        let tracked = usize::from(statement.setting.is_some());
        // more changes than tracked, or a tracked change the walk does not see as one
        untracked |= found != tracked;
        if matches!(search.verdict, Verdict::Deny(_)) {
            break;
        }
    }
    if search.deallocate_all
        && (analysis.statements.len() > 1 || depth > 0)
        && !matches!(search.verdict, Verdict::Deny(_))
    {
        search.verdict = deny(
            "internal_statement",
            "DEALLOCATE ALL must be sent as a statement of its own through rlsgate (it would drop statements rlsgate manages)".into(),
        );
    }
    analysis.verdict = search.verdict;
    analysis.session_state = search.session_state;
    analysis.session_set = search.session_set;
    analysis.untracked_set = untracked;
    if let (Some(kind), Verdict::Allow) = (search.reset, &analysis.verdict) {
        if analysis.statements.len() == 1 && depth == 0 {
            analysis.reset = Some(kind);
            analysis.statements[0].no_tx_block = true;
        } else {
            analysis.verdict = deny(
                "reset_all",
                "RESET ALL / DISCARD ALL must be sent as a statement of its own through rlsgate (it would clear the tenant context)"
                    .into(),
            );
        }
    }
    analysis
}

/// Text the guard cannot parse is denied (fail closed): the parser may be newer than the
/// server, or the text may be nested deeper than the guard reads; either way nothing in it
/// has been checked.
/// A text longer than `[guard] max_statement_bytes`: refused unread (classifying costs memory
/// and time in proportion to the text, several hundred bytes per byte).
pub(super) fn too_long(len: usize, max: usize) -> Analysis {
    unread(Denial {
        rule: "statement_too_long",
        sqlstate: sqlstate::PROGRAM_LIMIT_EXCEEDED,
        message: format!(
            "statement of {len} bytes is longer than rlsgate's guard checks (guard.max_statement_bytes = {max})"
        ),
    })
}

fn unparsable(e: &pg_query::Error) -> Analysis {
    let reason = match e {
        pg_query::Error::Parse(m) => m.clone(),
        pg_query::Error::Decode(_) => "statement is nested too deeply for rlsgate to check".into(),
        other => other.to_string(),
    };
    unread(Denial {
        rule: "unparsable",
        sqlstate: sqlstate::SYNTAX_ERROR,
        message: format!("statement could not be parsed by rlsgate's guard: {reason}"),
    })
}

/// A text the guard did not read: denied, nothing known about it.
fn unread(denial: Denial) -> Analysis {
    Analysis {
        verdict: Verdict::Deny(denial),
        statements: Vec::new(),
        session_state: None,
        session_set: false,
        untracked_set: false,
        parsed: false,
        reset: None,
        copy_from_stdin: false,
    }
}

fn stmt_range(raw: &RawStmt, total: usize) -> (usize, usize) {
    let start = usize::try_from(raw.stmt_location).unwrap_or(0).min(total);
    let end = if raw.stmt_len <= 0 {
        total
    } else {
        start
            .saturating_add(usize::try_from(raw.stmt_len).unwrap_or(0))
            .min(total)
    };
    (start, end)
}

fn top_level(node: &NodeEnum) -> (TxEffect, bool) {
    match node {
        NodeEnum::TransactionStmt(t) => {
            let kind =
                TransactionStmtKind::try_from(t.kind).unwrap_or(TransactionStmtKind::Undefined);
            match kind {
                TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart => {
                    (TxEffect::Begin, false)
                }
                TransactionStmtKind::TransStmtCommit | TransactionStmtKind::TransStmtRollback
                    if t.chain =>
                {
                    (TxEffect::Unknown, false)
                }
                TransactionStmtKind::TransStmtCommit
                | TransactionStmtKind::TransStmtRollback
                | TransactionStmtKind::TransStmtPrepare => (TxEffect::End, false),
                TransactionStmtKind::TransStmtCommitPrepared
                | TransactionStmtKind::TransStmtRollbackPrepared => (TxEffect::None, true),
                TransactionStmtKind::TransStmtSavepoint
                | TransactionStmtKind::TransStmtRelease
                | TransactionStmtKind::TransStmtRollbackTo
                | TransactionStmtKind::Undefined => (TxEffect::None, false),
            }
        }
        NodeEnum::VacuumStmt(v) => (TxEffect::None, v.is_vacuumcmd),
        NodeEnum::CreatedbStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::AlterSystemStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_)
        | NodeEnum::CreateSubscriptionStmt(_)
        | NodeEnum::DropSubscriptionStmt(_) => (TxEffect::None, true),
        NodeEnum::IndexStmt(i) => (TxEffect::None, i.concurrent),
        NodeEnum::DropStmt(d) => (TxEffect::None, d.concurrent),
        NodeEnum::ReindexStmt(r) => (TxEffect::None, has_defelem(&r.params, "concurrently")),
        NodeEnum::ClusterStmt(c) => (TxEffect::None, c.relation.is_none()),
        _ => (TxEffect::None, false),
    }
}

fn has_defelem(params: &[pg_query::protobuf::Node], name: &str) -> bool {
    params.iter().any(
        |p| matches!(&p.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case(name)),
    )
}
