//! What the guard knows about a statement shape ([`super::normalize`]): either the one verdict
//! every text of that shape gets, or that its texts must each be classified in full.
//!
//! A shape vouches for its texts only when its own classification (the `$n` text, through the
//! ordinary classifier) is a *plain allow*: one statement, allowed, and nothing the session has
//! to act on (transaction control, session state or settings, resets, COPY data, DEALLOCATE,
//! behaviour that depends on the transaction block). That verdict already holds for every value
//! a client could bind to the parameters, and a text of the shape is the shape with values
//! written in. Everything else, denials included, is left to the full classification of each
//! text: a denial's message names what was refused, and session effects carry values from the
//! text.
//!
//! The first text of a shape is classified in full as well, and the shape vouches for the
//! others only if the template gives that text exactly its own analysis. Since the shape
//! records the kinds of its literals, the others are the same token sequence; the check makes
//! sure that sequence parses (libpg_query reads `$n` in places Postgres takes only a string,
//! see [`super::normalize`]) and stands as one more guard against a template that does not
//! fit its texts.

use std::sync::Arc;

use super::GuardOptions;
use super::cache::Cost;
use super::classify::{self, Analysis, Statement, TxEffect, Verdict};
use super::normalize::{Normalized, statement_end};

#[derive(Debug, Clone)]
pub(super) enum Shape {
    /// Every text of the shape gets this analysis (with its own statement range).
    Template(Arc<Analysis>),
    /// Each text of the shape is classified in full.
    FullParse,
}

impl Shape {
    /// What the shape of `sql` (`normalized`) is, learnt from its key and from `sql` itself;
    /// with the full analysis of `sql` when it was classified on the way.
    pub fn learn(
        normalized: &Normalized,
        sql: &str,
        opts: &GuardOptions,
    ) -> (Shape, Option<Analysis>) {
        let template = classify::analyze(normalized.key(), opts);
        if !is_plain_allow(&template, normalized) {
            return (Shape::FullParse, None);
        }
        let full = classify::analyze(sql, opts);
        if answer(&template, sql) == full {
            (Shape::Template(Arc::new(template)), Some(full))
        } else {
            (Shape::FullParse, Some(full))
        }
    }
}

impl Cost for Shape {
    fn cost(&self) -> usize {
        match self {
            Shape::Template(analysis) => analysis.cost(),
            Shape::FullParse => 0,
        }
    }
}

/// The template's analysis for `sql`, a text of its shape: only the statement's range differs.
/// The statement starts where the key's does (before the first literal, where both texts are
/// the same) and, being the only one, runs to the end of the text. (Every field is named, so
/// that a field added to [`Analysis`] is a decision here too.)
pub(super) fn answer(template: &Analysis, sql: &str) -> Analysis {
    Analysis {
        verdict: template.verdict.clone(),
        statements: template
            .statements
            .iter()
            .map(|s| Statement {
                end: statement_end(sql),
                ..s.clone()
            })
            .collect(),
        session_state: template.session_state,
        session_set: template.session_set,
        untracked_set: template.untracked_set,
        parsed: template.parsed,
        reset: template.reset,
        copy_from_stdin: template.copy_from_stdin,
    }
}

/// Strict on purpose: anything not listed here as harmless makes the shape [`Shape::FullParse`].
fn is_plain_allow(a: &Analysis, normalized: &Normalized) -> bool {
    let [s] = a.statements.as_slice() else {
        return false;
    };
    a.parsed
        && a.verdict == Verdict::Allow
        && a.session_state.is_none()
        && !a.session_set
        && !a.untracked_set
        && a.reset.is_none()
        && !a.copy_from_stdin
        && s.tx == TxEffect::None
        && !s.no_tx_block
        // (SET LOCAL: libpg_query reads `SET LOCAL search_path = $1`, and the guard judges
        // the value, e.g. a temporary schema put on the path)
        && !s.block_sensitive
        && s.setting.is_none()
        && s.deallocate.is_none()
        // the range carries over to the texts of the shape only when it starts no later than the
        // first literal and runs to the end or to a final `;` (one statement, nothing after it)
        && s.start <= normalized.first_literal
        && s.end == statement_end(normalized.key())
}
