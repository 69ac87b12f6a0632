//! rlsgate: a PostgreSQL wire-protocol proxy that makes Row Level Security tenant isolation
//! automatic. Clients log in with a JWT as the password; every transaction rlsgate runs for them
//! upstream starts with `SET LOCAL app.current_store_id = '<tenant>'` (and the other `[context]`
//! settings), and no client can change those settings.
//!
//! ```text
//! client ─▶ client::handshake (SSL/Cancel/Startup, JWT → auth::Identity)
//!        ─▶ session (per client: units of work, transaction state)
//!             ├─ guard::Guard::analyze (pg_query) → allow / deny (42501)
//!             ├─ pool::Pool::checkout at transaction start
//!             ├─ context injection (SET LOCAL …, pipelined, replies swallowed)
//!             └─ relay (expect queue) ─▶ client
//!        ◀─ release to the pool on ReadyForQuery 'I' (transaction mode)
//! ```
//!
//! # Layout
//! - [`config`]: TOML config, `${VAR}` expansion, validation.
//! - [`protocol`]: framing and the few messages rlsgate reads or writes; no I/O.
//! - [`client`]: handshake, TLS, startup checks, password → identity.
//! - [`auth`]: JWT validation and claims → [`auth::Identity`].
//! - [`guard`]: statement classification; pure.
//! - [`session`]: the per-client state machine.
//! - [`pool`]: upstream connections (TLS, SCRAM/md5), checkout, release.
//! - [`pipeline`]: autocommit units of many clients pipelined onto shared connections.
//! - [`cancel`]: client cancel keys → the backend serving that client now.
//! - [`app`]: shared state, accept loop, shutdown. [`cli`]: the `rlsgate` commands.
//! - [`embedded_pg`]: a throwaway Postgres for `rlsgate demo` and the tests.

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod cancel;
pub mod cli;
pub mod client;
pub mod config;
pub mod doctor;
pub mod embedded_pg;
pub mod error;
pub mod fd_limit;
pub mod guard;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod pool;
pub mod protocol;
pub mod registry;
pub mod seal;
pub mod session;
pub mod stream;
pub mod tls;
