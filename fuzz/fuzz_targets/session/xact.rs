//! The fake server's transaction model (postgres.c / xact.c, folded): `start_xact_command`,
//! `finish_xact_command`, transaction statements, and running one statement, with the tenant
//! context oracle.

use std::sync::Arc;

use crate::fake::{Backend, Block, Done, PgError, aborted, err};
use crate::sql::{Kind, Stmt, TxKind};

impl Backend {
    // ------------------------------------------------------------------ transactions

    /// `start_xact_command`.
    pub(crate) fn begin_command(&mut self) {
        if self.block == Block::Default {
            self.block = Block::Started;
            self.locals = None;
        }
    }

    /// `finish_xact_command`: a started transaction commits.
    pub(crate) fn finish_command(&mut self) {
        if self.block == Block::Started {
            self.end_tx();
        }
    }

    pub(crate) fn end_tx(&mut self) {
        self.block = Block::Default;
        self.locals = None;
        self.savepoints.clear();
        self.portals.clear();
    }

    /// AND CHAIN: a new block, without the old one's SET LOCALs.
    pub(crate) fn chain(&mut self) {
        self.block = Block::InProgress;
        self.locals = None;
    }

    /// An error: the transaction aborts (a block stays, failed).
    pub(crate) fn fail(&mut self) {
        match self.block {
            Block::InProgress | Block::Aborted => self.block = Block::Aborted,
            Block::Default | Block::Started | Block::Implicit => self.end_tx(),
        }
    }

    pub(crate) fn in_block(&self) -> bool {
        matches!(self.block, Block::InProgress | Block::Implicit)
    }

    /// The oracle: a data statement runs with the client's tenant context.
    pub(crate) fn check_context(&self, st: &Stmt) {
        if st
            .text
            .contains("pg_catalog.has_function_privilege('pg_catalog.set_config")
        {
            // rlsgate's probe at connect (answered "false" here: the text is the row, see
            // `data_row`, so the context takes its SET LOCAL form, which this fake models)
            return;
        }
        let tenant = self.fake.tenant.lock().unwrap().clone();
        if self.locals.as_deref() != Some(tenant.as_str()) {
            let log: Vec<&str> = self.log.iter().map(String::as_str).collect();
            panic!(
                "tenant context missing: {:?} ran in a transaction ({:?}) whose app.current_store_id is {:?}, \
                 but the client is tenant {tenant:?}; last upstream messages:\n  {}",
                st.text,
                self.block,
                self.locals,
                log.join("\n  ")
            );
        }
    }

    pub(crate) fn tx(&mut self, t: &TxKind) -> Result<(), PgError> {
        let outside = |what: &str| {
            err(
                "25P01",
                format!("{what} can only be used in transaction blocks"),
            )
        };
        match t {
            TxKind::Begin(tag) => {
                if self.block == Block::InProgress {
                    self.warning("25001", "there is already a transaction in progress");
                }
                self.block = Block::InProgress;
                self.complete(tag);
            }
            TxKind::Commit { chain } | TxKind::Rollback { chain } => {
                let commit = matches!(t, TxKind::Commit { .. });
                match self.block {
                    Block::Default | Block::Started | Block::Implicit => {
                        if *chain {
                            return Err(outside(if commit {
                                "COMMIT AND CHAIN"
                            } else {
                                "ROLLBACK AND CHAIN"
                            }));
                        }
                        self.warning("25P01", "there is no transaction in progress");
                        self.end_tx();
                        self.complete(if commit { "COMMIT" } else { "ROLLBACK" });
                    }
                    Block::InProgress | Block::Aborted => {
                        let tag = if commit && self.block == Block::InProgress {
                            "COMMIT"
                        } else {
                            "ROLLBACK"
                        };
                        self.end_tx();
                        if *chain {
                            self.chain();
                        }
                        self.complete(tag);
                    }
                }
            }
            TxKind::Savepoint(name) => {
                if self.block != Block::InProgress {
                    return Err(outside("SAVEPOINT"));
                }
                self.savepoints.push((name.clone(), self.locals.clone()));
                self.complete("SAVEPOINT");
            }
            TxKind::Release(name) => {
                if self.block != Block::InProgress {
                    return Err(outside("RELEASE SAVEPOINT"));
                }
                let Some(i) = self.savepoints.iter().rposition(|(n, _)| n == name) else {
                    return Err(err("3B001", format!("savepoint \"{name}\" does not exist")));
                };
                self.savepoints.truncate(i);
                self.complete("RELEASE");
            }
            TxKind::RollbackTo(name) => {
                if !matches!(self.block, Block::InProgress | Block::Aborted) {
                    return Err(outside("ROLLBACK TO SAVEPOINT"));
                }
                let Some(i) = self.savepoints.iter().rposition(|(n, _)| n == name) else {
                    return Err(err("3B001", format!("savepoint \"{name}\" does not exist")));
                };
                self.locals = self.savepoints[i].1.clone();
                self.savepoints.truncate(i + 1);
                self.block = Block::InProgress;
                self.complete("ROLLBACK");
            }
            TxKind::Prepare => {
                // max_prepared_transactions = 0: the transaction is rolled back and gone.
                self.end_tx();
                return Err(err("55000", "prepared transactions are disabled"));
            }
            TxKind::Other => {
                if self.in_block() {
                    return Err(err(
                        "25001",
                        "COMMIT PREPARED cannot run inside a transaction block",
                    ));
                }
                return Err(err(
                    "42704",
                    "prepared transaction with identifier \"x\" does not exist",
                ));
            }
        }
        Ok(())
    }

    /// Run one statement (its transaction started). `simple`: a Query (RowDescription first);
    /// `max_rows`/`rows_left`: the Execute row limit and the portal's remaining rows.
    pub(crate) fn exec(
        &mut self,
        st: &Stmt,
        simple: bool,
        max_rows: i32,
        rows_left: &mut usize,
    ) -> Result<Done, PgError> {
        if self.block == Block::Aborted && !st.is_exit() {
            return Err(aborted());
        }
        match &st.kind {
            Kind::Empty => self.msg(b'I', &[]),
            Kind::Tx(t) => self.tx(t)?,
            Kind::Rows { tag, ctx, .. } => {
                if *ctx {
                    self.check_context(st);
                }
                if st.fails {
                    return Err(err("22012", "division by zero"));
                }
                if simple {
                    self.row_description();
                }
                let n = if max_rows > 0 && *rows_left > max_rows as usize {
                    max_rows as usize
                } else {
                    *rows_left
                };
                for _ in 0..n {
                    self.data_row(&st.text.clone());
                }
                *rows_left -= n;
                if n > 0 && *rows_left > 0 {
                    self.msg(b's', &[]);
                    return Ok(Done::Suspended);
                }
                match tag {
                    Some(t) => self.complete(t),
                    None => self.complete(&format!("SELECT {n}")),
                }
            }
            Kind::Dml(tag) => {
                self.check_context(st);
                if st.fails {
                    return Err(err("22012", "division by zero"));
                }
                self.complete(tag);
            }
            Kind::CopyIn => {
                self.check_context(st);
                self.msg(b'G', &[0, 0, 1, 0, 0]);
                self.flush = true;
                return Ok(Done::CopyIn);
            }
            Kind::CopyOut => {
                self.check_context(st);
                self.msg(b'H', &[0, 0, 1, 0, 0]);
                self.msg(b'd', b"1\n");
                self.msg(b'c', &[]);
                self.complete("COPY 1");
            }
            Kind::CopyFile => {
                return Err(err("42501", "permission denied to COPY to or from a file"));
            }
            Kind::SetLocal { name, value } => {
                if self.block == Block::Started {
                    self.warning("25P01", "SET LOCAL can only be used in transaction blocks");
                }
                if name == "app.current_store_id" {
                    self.locals = value.clone();
                }
                self.complete("SET");
            }
            Kind::Set { name, value } => {
                if name == "application_name" {
                    let v = value.clone().unwrap_or_else(|| "rlsgate".into());
                    self.parameter_status("application_name", &v);
                }
                self.complete(if value.is_some() { "SET" } else { "RESET" });
            }
            Kind::ResetAll => self.complete("RESET"),
            Kind::Discard { all, tag } => {
                if *all {
                    if self.in_block() {
                        return Err(err(
                            "25001",
                            "DISCARD ALL cannot run inside a transaction block",
                        ));
                    }
                    self.stmts.clear();
                    self.portals.clear();
                }
                self.complete(tag);
            }
            Kind::NoBlock(tag) => {
                if self.in_block() {
                    return Err(err(
                        "25001",
                        format!("{tag} cannot run inside a transaction block"),
                    ));
                }
                self.complete(tag);
            }
            Kind::Prepare(name) => {
                if self.stmts.contains_key(name) {
                    return Err(err(
                        "42P05",
                        format!("prepared statement \"{name}\" already exists"),
                    ));
                }
                let inner = Stmt {
                    text: st.text.clone(),
                    kind: Kind::Rows {
                        n: 1,
                        tag: None,
                        ctx: true,
                    },
                    nparams: 0,
                    fails: false,
                };
                self.stmts.insert(name.clone(), Arc::new(inner));
                self.complete("PREPARE");
            }
            Kind::ExecuteSql(name) => {
                if !self.stmts.contains_key(name) {
                    return Err(err(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    ));
                }
                self.check_context(st);
                if simple {
                    self.row_description();
                }
                self.data_row("1");
                self.complete("SELECT 1");
            }
            Kind::Deallocate(None) => {
                self.stmts.clear();
                self.complete("DEALLOCATE ALL");
            }
            Kind::Deallocate(Some(name)) => {
                if self.stmts.remove(name).is_none() {
                    return Err(err(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    ));
                }
                self.complete("DEALLOCATE");
            }
            Kind::Raise { code, message } => return Err(err(code, message.clone())),
            Kind::Declare => {
                if self.block == Block::Started {
                    return Err(err(
                        "25P01",
                        "DECLARE CURSOR can only be used in transaction blocks",
                    ));
                }
                self.check_context(st);
                self.complete("DECLARE CURSOR");
            }
            Kind::Other(tag) => {
                let tag = tag.clone();
                self.complete(&tag);
            }
        }
        Ok(Done::Complete)
    }
}
