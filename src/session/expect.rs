//! The expected-replies queue: one entry per message sent upstream, in order. The relay looks at
//! the front entry to decide whether a server message is forwarded, swallowed (replies to
//! messages rlsgate injected) or completes the entry. Replies rlsgate produces itself
//! (`Synthetic`) are emitted when they reach the front, so ordering is exact under pipelining.

use std::sync::Arc;

#[derive(Debug)]
pub enum Expect {
    /// Injected `SET LOCAL`s: swallow their ParseComplete, BindComplete, notices and
    /// CommandComplete; `remaining` CommandCompletes to go.
    Inject { remaining: usize },
    /// A message rlsgate added (a re-Parse on this connection): swallow one reply with this tag.
    Hidden { tag: u8, prepared: Option<Arc<str>> },
    /// A reply rlsgate produces itself (ParseComplete/CloseComplete for statements it tracks).
    Synthetic(u8),
    /// Forward exactly one reply with this tag (ParseComplete, BindComplete, CloseComplete).
    /// For a Parse: `prepared` is the server statement it creates and `client_name` the client's
    /// name for it; both are forgotten again if the Parse fails.
    One {
        tag: u8,
        prepared: Option<Arc<str>>,
        client_name: Option<Box<str>>,
    },
    /// Describe of a statement: ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    /// Describe of a portal: RowDescription or NoData.
    DescribePortal,
    /// Execute: rows (and COPY traffic) until CommandComplete, EmptyQuery or PortalSuspended.
    Execute,
    /// Sync: ReadyForQuery.
    Sync,
    /// Query: everything until ReadyForQuery; `segment` = a non-final piece of a split Query
    /// whose ReadyForQuery is swallowed.
    Query { segment: bool },
    /// A denial raised server-side: swallow ParseComplete/BindComplete, forward the error.
    Raise,
    /// The client's session settings replayed on this connection: swallow everything.
    Replay,
}
