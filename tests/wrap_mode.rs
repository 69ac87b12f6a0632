//! Every end-to-end suite again, with `[upstream] transaction_wrap = true` (support::WRAP is set
//! from this binary's name): the client-visible behaviour must not change.
// Each suite brings its own copy of the support module (one cluster each): intended.
#![allow(clippy::duplicate_mod)]

#[path = "clients.rs"]
mod clients;
#[path = "compat.rs"]
mod compat;
#[path = "copy_units.rs"]
mod copy_units;
#[path = "escapes.rs"]
mod escapes;
#[path = "guard_corpus.rs"]
mod guard_corpus;
#[path = "identity.rs"]
mod identity;
#[path = "isolation.rs"]
mod isolation;
#[path = "login.rs"]
mod login;
#[path = "pooling.rs"]
mod pooling;
#[path = "protocol.rs"]
mod protocol;
#[path = "settings_handoff.rs"]
mod settings_handoff;
