//! The client's extended-protocol unit (its messages since its last Sync) as the session tracks
//! it: what was sent of it, how its rest is treated, and what rlsgate owes it at the Sync.
//! Each concern is one enum, so that only the states that exist can be written down.

use crate::guard::TxEffect;

/// The client's open extended-protocol unit. Everything but `effect` is back to its rest state
/// once the unit's Sync is handled (`effect` is settled there too, see `on_sync`).
#[derive(Debug)]
pub(super) struct Unit {
    /// Extended-protocol messages were sent since the last Sync.
    pub open: bool,
    /// Transaction control bound in the open unit.
    pub effect: TxEffect,
    /// transaction_wrap: whether the unit runs in rlsgate's block.
    pub wrap: Wrap,
    /// transaction_wrap: the unit starts with the client's BEGIN; inject the context after the
    /// Execute of this portal.
    pub begin_portal: Option<Option<String>>,
    /// The unit's next statement needs the context applied first.
    pub reapply: Option<Reapply>,
    /// Whether the rest of the unit is dropped up to its Sync.
    pub skip: Skip,
}

impl Unit {
    /// No unit open; `effect` is what the last one left (kept while a client rests).
    pub fn closed(effect: TxEffect) -> Unit {
        Unit {
            open: false,
            effect,
            wrap: Wrap::Off,
            begin_portal: None,
            reapply: None,
            skip: Skip::No,
        }
    }

    /// Nothing of a unit is open, owed or being skipped.
    pub fn at_rest(&self) -> bool {
        !self.open
            && self.wrap == Wrap::Off
            && self.begin_portal.is_none()
            && self.reapply.is_none()
            && self.skip == Skip::No
    }

    /// Messages up to the Sync are dropped (Postgres ignores them after an error; so does rlsgate).
    pub fn skipping(&self) -> bool {
        self.skip != Skip::No
    }

    /// The server failed the unit (or is made to fail it): drop the client's messages up to its
    /// Sync, which the server answers. A unit rlsgate failed itself stays so.
    pub fn skip_to_sync(&mut self) {
        if self.skip == Skip::No {
            self.skip = Skip::ServerSync;
        }
    }

    /// transaction_wrap: the unit runs in rlsgate's block (one that runs a COPY FROM STDIN
    /// stays so).
    pub fn wrap_in_block(&mut self) {
        if self.wrap == Wrap::Off {
            self.wrap = Wrap::Block;
        }
    }
}

/// Dropping the rest of a failed unit, as Postgres does up to the next Sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Skip {
    No,
    /// A message was refused or failed on the server: the client's messages are dropped up to
    /// its Sync, which goes to the server and is answered there.
    ServerSync,
    /// rlsgate failed the unit itself (no server connection could be had, or no lane had
    /// room): dropped up to the Sync, which rlsgate answers when it holds no connection.
    LocalSync,
}

/// transaction_wrap: the open extended unit runs in rlsgate's own block, closed with rlsgate's
/// COMMIT after the client's Sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wrap {
    Off,
    Block,
    /// …and it runs COPY FROM STDIN: the COMMIT waits for the unit's ReadyForQuery.
    BlockCopy,
}

/// Why the tenant context must be applied again before the next statement of the open extended
/// unit: the transaction it was applied in may be over, or the unit started without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reapply {
    /// No transaction block is open: a COMMIT/ROLLBACK/PREPARE TRANSACTION or a statement that
    /// runs outside a transaction was executed, or the unit started without the context.
    Outside,
    /// Not known from the text: COMMIT/ROLLBACK AND CHAIN (a block without the context), an
    /// unparsed statement, or a simple Query inside the unit.
    Unknown,
}

/// Whether the client's units may go to pipeline lanes (see `pipelined`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lanes {
    /// Never (fixed at login: pipelining off, session pooling, transaction_wrap, …).
    Off,
    On,
    /// A lane gave the next unit back: it takes the usual path, later ones may go to lanes.
    NotNext,
}

impl Lanes {
    /// Whether the next unit goes the usual path because a lane gave it back (once).
    pub fn take_not_next(&mut self) -> bool {
        if *self == Lanes::NotNext {
            *self = Lanes::On;
            return true;
        }
        false
    }

    /// A lane gave the next unit back.
    pub fn not_next(&mut self) {
        if *self == Lanes::On {
            *self = Lanes::NotNext;
        }
    }
}
