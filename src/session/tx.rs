//! The client's transaction and COPY state on the held server connection, as the session tracks
//! them: what the server last reported, what it will report once everything sent has run, and
//! what the current transaction did. Each is changed only through the transitions below.

use crate::guard::TxEffect;
use crate::protocol::backend::TxStatus;

/// What the server state will be once everything sent so far has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Predicted {
    Idle,
    InBlock,
    /// Depends on replies still in flight (transaction control was pipelined).
    Unknown,
}

/// What a unit that ended leaves of its transaction's setting changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    /// The transaction goes on: nothing is settled yet.
    Open,
    /// It ended after an error or a rollback: its setting changes did not take.
    Discard,
    /// It committed: its setting changes hold.
    Commit,
}

/// The transaction on the held connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tx {
    /// Status from the last ReadyForQuery (Idle when no connection is held).
    observed: TxStatus,
    /// The state once everything sent so far has run.
    predicted: Predicted,
    /// An error (or a ROLLBACK) happened in the current transaction: its setting changes do
    /// not count.
    failed: bool,
    /// COMMIT/ROLLBACK AND CHAIN may have opened the current block without the context.
    chained: bool,
}

impl Default for Tx {
    fn default() -> Self {
        Tx {
            observed: TxStatus::Idle,
            predicted: Predicted::Idle,
            failed: false,
            chained: false,
        }
    }
}

impl Tx {
    pub fn predicted(&self) -> Predicted {
        self.predicted
    }

    /// Status from the last ReadyForQuery.
    pub fn observed(&self) -> TxStatus {
        self.observed
    }

    /// The status a reply rlsgate makes itself reports (`holds_server`: whether the client holds
    /// a connection; without one it is outside any transaction).
    pub fn reported(&self, holds_server: bool) -> TxStatus {
        match holds_server {
            true => self.observed,
            false => TxStatus::Idle,
        }
    }

    /// A possible AND CHAIN has not been looked at by a unit yet.
    pub fn chained(&self) -> bool {
        self.chained
    }

    /// A new unit takes over the possible AND CHAIN (see `start_unit`).
    pub fn take_chained(&mut self) -> bool {
        std::mem::take(&mut self.chained)
    }

    /// What follows waits for the replies in flight to tell the state.
    pub fn unknown(&mut self) {
        self.predicted = Predicted::Unknown;
    }

    /// An error raised in a block aborts it: what follows waits to see it.
    pub fn error_sent(&mut self) {
        if self.predicted == Predicted::InBlock {
            self.predicted = Predicted::Unknown;
        }
    }

    /// A fresh connection: nothing sent on it yet.
    pub fn connected(&mut self) {
        self.predicted = Predicted::Idle;
    }

    /// The current transaction failed (an error, a ROLLBACK, a COMMIT that rolled back).
    pub fn fail(&mut self) {
        self.failed = true;
    }

    /// A unit with this transaction effect was sent.
    pub fn after_unit(&mut self, effect: TxEffect) {
        if effect != TxEffect::None {
            self.predicted = Predicted::Unknown;
        }
        if effect == TxEffect::Unknown {
            // maybe COMMIT/ROLLBACK AND CHAIN: see start_unit
            self.chained = true;
        }
    }

    /// A ReadyForQuery with `status` arrived. `last`: it answers the last thing in flight and no
    /// extended unit of the client's is open, so it tells the state after all the client sent.
    /// Returns what the unit's end settles of the transaction's setting changes.
    pub fn on_ready(&mut self, status: TxStatus, last: bool) -> Settle {
        self.observed = status;
        if last {
            self.predicted = match status {
                TxStatus::Idle => Predicted::Idle,
                TxStatus::InBlock | TxStatus::Failed => Predicted::InBlock,
            };
        }
        match status {
            TxStatus::InBlock => Settle::Open,
            TxStatus::Failed => {
                self.failed = true;
                Settle::Open
            }
            TxStatus::Idle if std::mem::take(&mut self.failed) => Settle::Discard,
            TxStatus::Idle => Settle::Commit,
        }
    }
}

/// COPY FROM STDIN on the held connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyState {
    /// No COPY FROM STDIN sent and unanswered, none running.
    Off,
    /// A COPY FROM STDIN may have been sent and not answered yet (see `Expect::awaits_copy`):
    /// what the server makes of the client's next message depends on whether it reads data
    /// then, so other messages wait.
    Awaited,
    /// The server is in COPY FROM STDIN: it ignores Sync and Flush until CopyDone/CopyFail.
    In,
}
