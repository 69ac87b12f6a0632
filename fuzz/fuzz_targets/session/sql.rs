//! The fake server's view of SQL text: statements split and classified with pg_query (the
//! parser Postgres itself uses), reduced to what decides the replies and the transaction state.

use std::sync::Arc;

use pg_query::NodeEnum;
use pg_query::protobuf::{DiscardMode, TransactionStmtKind, VariableSetKind, a_const};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TxKind {
    Begin(&'static str),
    Commit { chain: bool },
    Rollback { chain: bool },
    Savepoint(String),
    Release(String),
    RollbackTo(String),
    Prepare,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Empty,
    Tx(TxKind),
    /// Rows: how many, the completion tag (`None` = "SELECT n"), whether it needs the context.
    Rows {
        n: usize,
        tag: Option<&'static str>,
        ctx: bool,
    },
    Dml(&'static str),
    CopyIn,
    CopyOut,
    CopyFile,
    SetLocal {
        name: String,
        value: Option<String>,
    },
    Set {
        name: String,
        value: Option<String>,
    },
    ResetAll,
    Discard {
        all: bool,
        tag: &'static str,
    },
    NoBlock(&'static str),
    Prepare(String),
    ExecuteSql(String),
    Deallocate(Option<String>),
    Raise {
        code: String,
        message: String,
    },
    Declare,
    Other(String),
}

#[derive(Debug)]
pub(crate) struct Stmt {
    pub(crate) text: String,
    pub(crate) kind: Kind,
    pub(crate) nparams: usize,
    /// Fails when run (division by zero).
    pub(crate) fails: bool,
}

impl Stmt {
    pub(crate) fn empty() -> Stmt {
        Stmt {
            text: String::new(),
            kind: Kind::Empty,
            nparams: 0,
            fails: false,
        }
    }

    pub(crate) fn is_tx(&self) -> bool {
        matches!(self.kind, Kind::Tx(_))
    }

    /// `IsTransactionExitStmt`: may run in an aborted block.
    pub(crate) fn is_exit(&self) -> bool {
        matches!(
            self.kind,
            Kind::Tx(
                TxKind::Commit { .. }
                    | TxKind::Rollback { .. }
                    | TxKind::RollbackTo(_)
                    | TxKind::Prepare
            )
        )
    }

    pub(crate) fn needs_commit(&self) -> bool {
        matches!(self.kind, Kind::NoBlock(_))
    }

    pub(crate) fn returns_rows(&self) -> bool {
        matches!(self.kind, Kind::Rows { .. } | Kind::ExecuteSql(_))
            || (matches!(self.kind, Kind::Dml(_))
                && self.text.to_ascii_uppercase().contains("RETURNING"))
    }
}

/// `$n` references in the text (the server infers that many parameters).
fn count_params(sql: &str) -> usize {
    let b = sql.as_bytes();
    let mut max = 0;
    for (i, &c) in b.iter().enumerate() {
        if c == b'$' {
            let digits: String = b[i + 1..]
                .iter()
                .take_while(|d| d.is_ascii_digit())
                .take(3)
                .map(|&d| d as char)
                .collect();
            if let Ok(n) = digits.parse::<usize>() {
                max = max.max(n);
            }
        }
    }
    max
}

fn quoted_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let start = text.find(key)? + key.len();
    let rest = &text[start..];
    Some(&rest[..rest.find('\'').unwrap_or(rest.len())])
}

fn sval(args: &[pg_query::Node]) -> Option<String> {
    args.iter().find_map(|a| match a.node.as_ref()? {
        NodeEnum::AConst(c) => match c.val.as_ref()? {
            a_const::Val::Sval(s) => Some(s.sval.clone()),
            a_const::Val::Ival(i) => Some(i.ival.to_string()),
            _ => None,
        },
        _ => None,
    })
}

fn kind_of(node: &NodeEnum, text: &str) -> Kind {
    let upper = text.to_ascii_uppercase();
    let rows = |tag, ctx| Kind::Rows {
        n: if upper.contains("GENERATE_SERIES") {
            3
        } else {
            1
        },
        tag,
        ctx,
    };
    match node {
        NodeEnum::TransactionStmt(t) => Kind::Tx(match t.kind() {
            TransactionStmtKind::TransStmtBegin => TxKind::Begin("BEGIN"),
            TransactionStmtKind::TransStmtStart => TxKind::Begin("START TRANSACTION"),
            TransactionStmtKind::TransStmtCommit => TxKind::Commit { chain: t.chain },
            TransactionStmtKind::TransStmtRollback => TxKind::Rollback { chain: t.chain },
            TransactionStmtKind::TransStmtSavepoint => TxKind::Savepoint(t.savepoint_name.clone()),
            TransactionStmtKind::TransStmtRelease => TxKind::Release(t.savepoint_name.clone()),
            TransactionStmtKind::TransStmtRollbackTo => {
                TxKind::RollbackTo(t.savepoint_name.clone())
            }
            TransactionStmtKind::TransStmtPrepare => TxKind::Prepare,
            _ => TxKind::Other,
        }),
        NodeEnum::SelectStmt(_) => rows(None, true),
        NodeEnum::ExplainStmt(_) => rows(Some("EXPLAIN"), true),
        NodeEnum::VariableShowStmt(_) => rows(Some("SHOW"), false),
        NodeEnum::FetchStmt(_) => rows(Some("FETCH 1"), true),
        NodeEnum::InsertStmt(_) => Kind::Dml("INSERT 0 1"),
        NodeEnum::UpdateStmt(_) => Kind::Dml("UPDATE 1"),
        NodeEnum::DeleteStmt(_) => Kind::Dml("DELETE 1"),
        NodeEnum::MergeStmt(_) => Kind::Dml("MERGE 1"),
        NodeEnum::CopyStmt(c) if c.filename.is_empty() && !c.is_program => {
            if c.is_from {
                Kind::CopyIn
            } else {
                Kind::CopyOut
            }
        }
        NodeEnum::CopyStmt(_) => Kind::CopyFile,
        NodeEnum::VariableSetStmt(v) => match v.kind() {
            VariableSetKind::VarSetValue
            | VariableSetKind::VarSetDefault
            | VariableSetKind::VarSetCurrent => {
                let value = sval(&v.args);
                if v.is_local {
                    Kind::SetLocal {
                        name: v.name.clone(),
                        value,
                    }
                } else {
                    Kind::Set {
                        name: v.name.clone(),
                        value,
                    }
                }
            }
            VariableSetKind::VarReset => Kind::Set {
                name: v.name.clone(),
                value: None,
            },
            VariableSetKind::VarResetAll => Kind::ResetAll,
            _ => Kind::Other("SET".into()),
        },
        NodeEnum::DiscardStmt(d) => match d.target() {
            DiscardMode::DiscardAll => Kind::Discard {
                all: true,
                tag: "DISCARD ALL",
            },
            DiscardMode::DiscardSequences => Kind::Discard {
                all: false,
                tag: "DISCARD SEQUENCES",
            },
            DiscardMode::DiscardTemp => Kind::Discard {
                all: false,
                tag: "DISCARD TEMP",
            },
            _ => Kind::Discard {
                all: false,
                tag: "DISCARD PLANS",
            },
        },
        NodeEnum::VacuumStmt(v) if v.is_vacuumcmd => Kind::NoBlock("VACUUM"),
        NodeEnum::CreatedbStmt(_) => Kind::NoBlock("CREATE DATABASE"),
        NodeEnum::DropdbStmt(_) => Kind::NoBlock("DROP DATABASE"),
        NodeEnum::AlterSystemStmt(_) => Kind::NoBlock("ALTER SYSTEM"),
        NodeEnum::IndexStmt(i) if i.concurrent => Kind::NoBlock("CREATE INDEX"),
        NodeEnum::PrepareStmt(p) => Kind::Prepare(p.name.clone()),
        NodeEnum::ExecuteStmt(e) => Kind::ExecuteSql(e.name.clone()),
        NodeEnum::DeallocateStmt(d) if d.isall || d.name.is_empty() => Kind::Deallocate(None),
        NodeEnum::DeallocateStmt(d) => Kind::Deallocate(Some(d.name.clone())),
        NodeEnum::DoStmt(_) if text.contains("$rlsgate$") => Kind::Raise {
            code: quoted_after(text, "ERRCODE = '")
                .unwrap_or("P0001")
                .to_string(),
            message: quoted_after(text, "MESSAGE = '").unwrap_or("").to_string(),
        },
        NodeEnum::DeclareCursorStmt(_) => Kind::Declare,
        NodeEnum::ClosePortalStmt(_) => Kind::Other("CLOSE CURSOR".into()),
        _ => Kind::Other(
            upper
                .split_whitespace()
                .next()
                .unwrap_or("OK")
                .chars()
                .filter(|c| c.is_ascii_alphabetic())
                .collect(),
        ),
    }
}

/// Split and classify a Query/Parse text the way the server's parser does.
pub(crate) fn classify(sql: &str) -> Result<Vec<Arc<Stmt>>, String> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        let start = raw.stmt_location.max(0) as usize;
        let end = if raw.stmt_len > 0 {
            start + raw.stmt_len as usize
        } else {
            sql.len()
        };
        let text = sql.get(start..end).unwrap_or(sql).trim().to_string();
        let kind = kind_of(node, &text);
        let fails = matches!(kind, Kind::Rows { .. } | Kind::Dml(_)) && text.contains("1/0");
        out.push(Arc::new(Stmt {
            nparams: count_params(&text),
            text,
            kind,
            fails,
        }));
    }
    Ok(out)
}
