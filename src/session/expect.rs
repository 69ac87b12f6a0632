//! The expected-replies queue: one entry per message sent upstream, in order. The relay looks at
//! the front entry to decide whether a server message is forwarded, swallowed (replies to
//! messages rlsgate injected) or completes the entry. Replies rlsgate produces itself
//! (`Synthetic`) are emitted when they reach the front, so ordering is exact under pipelining.

use std::sync::Arc;

use bytes::Bytes;

use crate::guard::TxEffect;

#[derive(Debug)]
pub enum Expect {
    /// The injected tenant context (with transaction_wrap, also the `BEGIN` or `COMMIT` of
    /// rlsgate's block, see `block`): swallow its ParseCompletes, BindCompletes, rows, notices
    /// and CommandCompletes; `remaining` CommandCompletes to go. `parsed`: the context statements
    /// Parsed with it (forgotten if the injection fails or is skipped). `discards`: it is the
    /// `DISCARD SEQUENCES` between tenants (see `Session::discard_inline`); should it fail or be
    /// skipped, the connection's sequence state is unknown.
    Inject {
        remaining: usize,
        parsed: Option<Box<[Arc<str>]>>,
        block: BlockEdge,
        discards: bool,
    },
    /// A message rlsgate added (a re-Parse on this connection): swallow one reply with this tag.
    Hidden { tag: u8, prepared: Option<Arc<str>> },
    /// A reply rlsgate produces itself (ParseComplete/CloseComplete for statements it tracks).
    Synthetic(u8),
    /// Whole messages rlsgate produces itself (answers to `rlsgate.reauth($1)`).
    Reply(Bytes),
    /// Forward exactly one reply with this tag (ParseComplete, BindComplete, CloseComplete).
    /// For a Parse: `prepared` is the server statement it creates and `client_name` the client's
    /// name for it; both are forgotten again if the Parse fails. For a Bind: `prepared` is the
    /// server statement it binds (named ones only).
    One {
        tag: u8,
        prepared: Option<Arc<str>>,
        client_name: Option<Box<str>>,
    },
    /// A client Bind that replaces a portal tracked as ending the transaction: forward its
    /// BindComplete. If the server skips it (after an error), the old portal and its entry stay.
    Rebind {
        portal: Box<str>,
        effect: TxEffect,
        unit: u64,
    },
    /// Describe of a statement: ParameterDescription, then RowDescription or NoData.
    /// `prepared`: the server name of rlsgate's statement described (`None`: the unnamed one).
    DescribeStatement { prepared: Option<Arc<str>> },
    /// Describe of a portal: RowDescription or NoData. Also the rest of a statement's Describe,
    /// `prepared` naming rlsgate's statement described (`None`: a portal, the unnamed one).
    DescribePortal { prepared: Option<Arc<str>> },
    /// Execute: rows (and COPY traffic) until CommandComplete, EmptyQuery or PortalSuspended.
    /// `copy`: it runs COPY FROM STDIN and the server has not answered yet.
    Execute { copy: bool },
    /// Sync: ReadyForQuery (then `after`).
    Sync { after: After },
    /// Query: everything until ReadyForQuery (then `after`). `copy` as for Execute.
    /// `refusal`: the guard refused the client's Query and rlsgate sent a statement the server
    /// cannot parse instead, so that the transaction state is exactly Postgres'; the client gets
    /// this ErrorResponse in place of the server's.
    Query {
        after: After,
        copy: bool,
        refusal: Option<Bytes>,
    },
    /// A refused extended-protocol message: the server fails rlsgate's unparsable Parse and
    /// skips to Sync; the client gets `error` in place of the server's ErrorResponse.
    Raise { error: Bytes },
    /// A statement rlsgate runs itself (settings replay, the `BEGIN` of transaction_wrap):
    /// swallow everything up to and including its ReadyForQuery.
    HiddenQuery { what: &'static str },
    /// transaction_wrap's own `COMMIT` closing a client's autocommit unit: swallow its
    /// CommandComplete and notices, forward an error (a commit-time failure is the client's),
    /// then `after` for its ReadyForQuery. `held`: the wrapped Query's last CommandComplete,
    /// forwarded once the COMMIT succeeds and dropped if it fails (Postgres commits a Query's
    /// implicit transaction before it completes the last statement). `synced`: bound and
    /// followed by a Sync of rlsgate's own (else a Query), so the server stops skipping after an
    /// error there. A ReadyForQuery that still shows a block means the COMMIT did not end it
    /// (see `relay::on_ready`).
    WrapCommit {
        after: After,
        held: Option<Bytes>,
        synced: bool,
    },
}

impl Expect {
    /// A client's (or rlsgate's own) Query.
    pub fn query(after: After, copy: bool) -> Expect {
        Expect::Query {
            after,
            copy,
            refusal: None,
        }
    }

    /// A COPY FROM STDIN the server has not answered yet (CopyInResponse or an error).
    pub fn awaits_copy(&self) -> bool {
        matches!(
            self,
            Expect::Execute { copy: true } | Expect::Query { copy: true, .. }
        )
    }
}

/// Whether an injection also opens or closes transaction_wrap's block (prepared `BEGIN` /
/// `COMMIT`, bound like the context: no ReadyForQuery of their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockEdge {
    /// The context alone, in whatever transaction is open.
    Neither,
    /// `BEGIN`, then the context.
    Begin,
    /// `COMMIT` (no context), ahead of the client's Sync. Its error is the client's (a
    /// commit-time failure), not an injection failure.
    Commit,
}

/// What happens with the ReadyForQuery that completes an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Forward it to the client.
    Forward,
    /// Swallow it: the client's unit goes on (wrapped unit before rlsgate's COMMIT).
    Swallow,
    /// Swallow it and send the next piece of a split Query.
    ContinueSplit,
    /// Swallow it, then send rlsgate's COMMIT (after a wrapped COPY FROM STDIN).
    SwallowThenCommit,
    /// Forward it; the unit's transaction_wrap `COMMIT` was skipped or failed, so a block it
    /// shows is rlsgate's, still open: closed as in `relay::on_ready`.
    CloseBlock,
    /// Forward it: the last piece of a split Query.
    FinishSplit,
}

impl After {
    /// For a piece of a split Query: the last one answers the client.
    pub fn for_piece(more: bool) -> After {
        if more {
            After::ContinueSplit
        } else {
            After::FinishSplit
        }
    }
}
