//! End-to-end suites again with `[server] pipeline_depth = 4` (support::PIPELINED is set from
//! this binary's name): plain autocommit units of different clients then share pipelined
//! server connections, and what clients see must not change (cancels included: `pooling.rs`).
// Each suite brings its own copy of the support module (one cluster each): intended.
#![allow(clippy::duplicate_mod)]

#[path = "clients.rs"]
mod clients;
#[path = "compat.rs"]
mod compat;
#[path = "copy_units.rs"]
mod copy_units;
#[path = "discard.rs"]
mod discard;
#[path = "escapes.rs"]
mod escapes;
#[path = "guard_corpus.rs"]
mod guard_corpus;
#[path = "identity.rs"]
mod identity;
#[path = "isolation.rs"]
mod isolation;
#[path = "lexer_guard.rs"]
mod lexer_guard;
#[path = "migrations.rs"]
mod migrations;
#[path = "pooling.rs"]
mod pooling;
#[path = "protocol.rs"]
mod protocol;
#[path = "refusals.rs"]
mod refusals;
#[path = "settings_handoff.rs"]
mod settings_handoff;
