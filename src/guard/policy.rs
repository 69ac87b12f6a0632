//! What the guard allows, by statement kind, function and relation. Pure tables and small
//! lookups; the tree walk in [`super::search`] applies them.
//!
//! Statement kinds are an **allowlist**: a kind not named here (including any kind a future
//! parser version adds) is denied. Functions and relations are denylists over the names that
//! execute SQL text, signal or expose other backends, or reach objects RLS cannot protect; the
//! statement allowlist keeps a client from creating new names for them.

use pg_query::protobuf::{AlterTableType, ObjectType};

/// What the guard decides for a statement kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindRule {
    /// Allowed (its parts are still walked and checked).
    Allow,
    /// Binds code to run later (functions, aggregates, operators, casts, triggers…): allowed
    /// only with `[guard] allow_create_function`.
    Code,
    /// `DO`: allowed only with `[guard] allow_do_blocks`.
    DoBlock,
    /// Denied, with the reason.
    Deny(&'static str),
}

/// The rule for a statement node kind (the serde name of the parse-tree node).
pub fn statement_kind(kind: &str) -> KindRule {
    use KindRule::*;
    match kind {
        // Data, transactions, sessions, cursors: the everyday statements.
        "SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
        | "TransactionStmt" | "VariableSetStmt" | "VariableShowStmt" | "ExplainStmt"
        | "CopyStmt" | "PrepareStmt" | "ExecuteStmt" | "DeallocateStmt" | "DeclareCursorStmt"
        | "FetchStmt" | "ClosePortalStmt" | "ListenStmt" | "UnlistenStmt" | "NotifyStmt"
        | "LockStmt" | "DiscardStmt" | "VacuumStmt" | "ClusterStmt" | "ReindexStmt"
        | "ConstraintsSetStmt" | "CallStmt" => Allow,
        // Schema changes a migration makes (privileges are the server's to check).
        "CreateStmt"
        | "AlterTableStmt"
        | "IndexStmt"
        | "DropStmt"
        | "ViewStmt"
        | "CreateTableAsStmt"
        | "CreateSeqStmt"
        | "AlterSeqStmt"
        | "CreateSchemaStmt"
        | "RenameStmt"
        | "CommentStmt"
        | "GrantStmt"
        | "CreateEnumStmt"
        | "AlterEnumStmt"
        | "CreateDomainStmt"
        | "AlterDomainStmt"
        | "CompositeTypeStmt"
        | "CreateStatsStmt"
        | "AlterStatsStmt"
        | "RefreshMatViewStmt"
        | "RuleStmt"
        | "CreatePolicyStmt"
        | "AlterPolicyStmt"
        | "AlterCollationStmt"
        | "AlterTsdictionaryStmt"
        | "AlterTsconfigurationStmt"
        | "AlterObjectSchemaStmt"
        | "DefineStmt"
        | "ReplicaIdentityStmt" => Allow,
        // Code that runs later, in other tenants' transactions too.
        "CreateFunctionStmt"
        | "AlterFunctionStmt"
        | "CreateTrigStmt"
        | "CreateCastStmt"
        | "CreateConversionStmt"
        | "CreateRangeStmt"
        | "AlterOperatorStmt"
        | "AlterTypeStmt"
        | "CreateOpClassStmt"
        | "CreateOpFamilyStmt"
        | "AlterOpFamilyStmt"
        | "CreateTransformStmt" => Code,
        "DoStmt" => DoBlock,
        "TruncateStmt" => Deny(
            "TRUNCATE ignores row-level security and would remove every tenant's rows; use DELETE",
        ),
        "AlterRoleSetStmt" | "AlterDatabaseSetStmt" | "AlterSystemStmt" => {
            Deny("it changes settings for every future connection, of every tenant")
        }
        "CreateRoleStmt"
        | "AlterRoleStmt"
        | "DropRoleStmt"
        | "GrantRoleStmt"
        | "ReassignOwnedStmt"
        | "DropOwnedStmt"
        | "AlterOwnerStmt"
        | "AlterDefaultPrivilegesStmt" => Deny(
            "roles, ownership and default privileges are shared by every tenant; manage them directly on the database",
        ),
        "CreatedbStmt"
        | "DropdbStmt"
        | "AlterDatabaseStmt"
        | "AlterDatabaseRefreshCollStmt"
        | "CreateTableSpaceStmt"
        | "DropTableSpaceStmt"
        | "AlterTableSpaceOptionsStmt"
        | "AlterTableMoveAllStmt"
        | "CheckPointStmt"
        | "LoadStmt" => Deny("it acts on the whole cluster, not on one tenant's data"),
        "CreateExtensionStmt"
        | "AlterExtensionStmt"
        | "AlterExtensionContentsStmt"
        | "CreateFdwStmt"
        | "AlterFdwStmt"
        | "CreateForeignServerStmt"
        | "AlterForeignServerStmt"
        | "CreateForeignTableStmt"
        | "CreateUserMappingStmt"
        | "AlterUserMappingStmt"
        | "DropUserMappingStmt"
        | "ImportForeignSchemaStmt"
        | "CreatePublicationStmt"
        | "AlterPublicationStmt"
        | "CreateSubscriptionStmt"
        | "AlterSubscriptionStmt"
        | "DropSubscriptionStmt"
        | "CreateEventTrigStmt"
        | "AlterEventTrigStmt"
        | "CreatePlangStmt"
        | "CreateAmStmt"
        | "SecLabelStmt"
        | "AlterObjectDependsStmt" => Deny(
            "extensions, foreign data, replication, event triggers and languages are installed by the database administrator",
        ),
        _ => Deny("rlsgate does not know what this kind of statement can do"),
    }
}

/// Statements whose parts are stored and run later (views, rules, defaults, policies…).
pub fn stores_code(kind: &str) -> bool {
    matches!(
        kind,
        "ViewStmt"
            | "RuleStmt"
            | "CreateTableAsStmt"
            | "CreateStmt"
            | "AlterTableStmt"
            | "CreateDomainStmt"
            | "AlterDomainStmt"
            | "CreatePolicyStmt"
            | "AlterPolicyStmt"
            | "CreateSchemaStmt"
            | "CreateTrigStmt"
            | "CreateFunctionStmt"
            | "IndexStmt"
            | "CreateStatsStmt"
            | "PrepareStmt"
            | "DeclareCursorStmt"
    )
}

/// Object types that are code (renaming, moving or commenting them is like creating them).
pub fn is_code_object(object_type: i64) -> bool {
    [
        ObjectType::ObjectAggregate,
        ObjectType::ObjectCast,
        ObjectType::ObjectConversion,
        ObjectType::ObjectFunction,
        ObjectType::ObjectLanguage,
        ObjectType::ObjectOpclass,
        ObjectType::ObjectOperator,
        ObjectType::ObjectOpfamily,
        ObjectType::ObjectProcedure,
        ObjectType::ObjectRoutine,
        ObjectType::ObjectTransform,
        ObjectType::ObjectTsparser,
        ObjectType::ObjectTstemplate,
    ]
    .iter()
    .any(|t| *t as i64 == object_type)
}

pub fn is_large_object(object_type: i64) -> bool {
    object_type == ObjectType::ObjectLargeobject as i64
}

/// `CREATE AGGREGATE/OPERATOR/TYPE/TEXT SEARCH PARSER|TEMPLATE` bind functions; collations and
/// text search dictionaries/configurations only name existing ones.
pub fn define_is_code(kind: i64) -> bool {
    ![
        ObjectType::ObjectCollation,
        ObjectType::ObjectTsdictionary,
        ObjectType::ObjectTsconfiguration,
    ]
    .iter()
    .any(|t| *t as i64 == kind)
}

/// `ALTER TABLE` actions that switch row-level security off or hand the table to another role.
pub fn alter_table_denial(subtype: i64) -> Option<&'static str> {
    if subtype == AlterTableType::AtDisableRowSecurity as i64
        || subtype == AlterTableType::AtNoForceRowSecurity as i64
    {
        Some("switching row-level security off is not allowed through rlsgate")
    } else if subtype == AlterTableType::AtChangeOwner as i64 {
        Some(
            "changing a table's owner is not allowed through rlsgate (owners bypass row-level security)",
        )
    } else {
        None
    }
}

/// What a function name means to the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionRule {
    Ordinary,
    /// `set_config`: checked by its arguments.
    SetConfig,
    /// Runs SQL given as text in these argument positions (`None` = every argument).
    RunsSql(Option<&'static [usize]>),
    /// Denied, with rule name and reason.
    Deny(&'static str, &'static str),
    /// Large objects: denied unless `[guard] allow_large_objects`.
    LargeObject,
    /// Session-level advisory locks: session state (pin).
    SessionLock,
    /// `pg_notify`: denied unless `[guard] allow_notifications`.
    Notification,
    /// Reads what its (constant) first argument names; non-constant arguments are denied.
    ReadsByName(NameKind),
}

/// What the first argument of a [`FunctionRule::ReadsByName`] function names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A relation (`table_to_xml`): checked like a relation reference.
    Relation,
    /// A schema (`schema_to_xml`): system schemas hold other backends' activity.
    Schema,
    /// `database_to_xml` (skips system schemas), `cursor_to_xml` (the client's own cursor).
    Other,
}

/// A system schema (`pg_catalog`, `pg_toast`, `information_schema`, …).
pub fn is_system_schema(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("pg_") || lower == "information_schema"
}

/// The rule for a function, by its lower-cased name (any schema: a client cannot create
/// functions, so a same-named function elsewhere is denied too rather than guessed at).
pub fn function(name: &str) -> FunctionRule {
    use FunctionRule::*;
    match name {
        "set_config" => SetConfig,
        // Functions that execute a query passed as text, found by probing every text-taking
        // function of pg_catalog and of the extensions shipped with the server
        // (tests/sql_exec_catalog.rs keeps this list complete).
        "query_to_xml" | "query_to_xmlschema" | "query_to_xml_and_xmlschema" | "ts_stat" => {
            RunsSql(Some(&[0]))
        }
        "ts_rewrite" => RunsSql(Some(&[1])),
        // tablefunc: crosstab(sql), crosstab(sql, int), crosstab(source_sql, category_sql).
        n if n.starts_with("crosstab") => RunsSql(None),
        // dblink runs SQL in another backend, which never has the tenant context.
        n if n.starts_with("dblink") => Deny(
            "sql_exec_function",
            "it runs SQL on another connection, outside the tenant context and out of rlsgate's sight",
        ),
        // tablefunc's connectby and xml2's xpath_table paste their name arguments into SQL.
        "connectby" | "xpath_table" => Deny(
            "sql_exec_function",
            "it builds and runs SQL from its arguments, which rlsgate cannot check",
        ),
        // They read a table, a schema or the database named by their arguments.
        n if n.starts_with("table_to_xml") => ReadsByName(NameKind::Relation),
        n if n.starts_with("schema_to_xml") => ReadsByName(NameKind::Schema),
        n if n.starts_with("database_to_xml") || n.starts_with("cursor_to_xml") => {
            ReadsByName(NameKind::Other)
        }
        "pg_cancel_backend"
        | "pg_terminate_backend"
        | "pg_signal_backend"
        | "pg_reload_conf"
        | "pg_rotate_logfile"
        | "pg_rotate_logfile_old"
        | "pg_promote"
        | "pg_log_backend_memory_contexts"
        | "pg_wal_replay_pause"
        | "pg_wal_replay_resume"
        | "pg_switch_wal"
        | "pg_create_restore_point"
        | "pg_backup_start"
        | "pg_backup_stop"
        | "pg_start_backup"
        | "pg_stop_backup" => Deny(
            "signal_function",
            "it acts on other backends of the shared upstream role, which serve other tenants",
        ),
        "pg_stat_get_activity"
        | "pg_stat_get_backend_activity"
        | "pg_stat_statements"
        | "pg_stat_statements_info"
        | "pg_stat_statements_reset"
        | "pg_prepared_statement"
        | "pg_get_backend_memory_contexts" => Deny(
            "activity",
            "it shows other backends' statements, which belong to other tenants",
        ),
        "setseed" => Deny(
            "session_state",
            "setseed() changes the random sequence of a pooled connection that other tenants use next",
        ),
        "loread" | "lowrite" => LargeObject,
        n if n.starts_with("lo_") => LargeObject,
        "pg_advisory_lock"
        | "pg_advisory_lock_shared"
        | "pg_try_advisory_lock"
        | "pg_try_advisory_lock_shared" => SessionLock,
        "pg_notify" => Notification,
        _ => Ordinary,
    }
}

/// What a relation name means to the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelationRule {
    Ordinary,
    /// `pg_settings`: reading is fine, writing is `set_config`.
    Settings,
    Deny(&'static str, &'static str),
    LargeObject,
}

pub fn relation(name: &str) -> RelationRule {
    use RelationRule::*;
    match name {
        "pg_settings" => Settings,
        "pg_stat_activity" | "pg_stat_statements" | "pg_stat_statements_info" => Deny(
            "activity",
            "it shows other backends' statements, which belong to other tenants",
        ),
        "pg_prepared_statements" => Deny(
            "activity",
            "the prepared statements of a pooled connection belong to other tenants too",
        ),
        "pg_largeobject" | "pg_largeobject_metadata" => LargeObject,
        _ => Ordinary,
    }
}

/// Settings that change who the session is.
pub const ROLE_SETTINGS: &[&str] = &["role", "session_authorization"];

/// Settings that change how the server reads SQL text. The guard reads it with
/// `standard_conforming_strings = on`, `backslash_quote = safe_encoding` and UTF-8; any other
/// value would let the server see other statements than the guard did.
pub fn lexer_setting(name: &str) -> bool {
    matches!(
        name,
        "standard_conforming_strings" | "backslash_quote" | "client_encoding"
    )
}

/// Whether `value` is the value the guard itself assumes for a lexer setting.
pub fn lexer_value_ok(name: &str, value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    match name {
        "standard_conforming_strings" => matches!(v.as_str(), "on" | "true" | "yes" | "1" | "t"),
        "backslash_quote" => v == "safe_encoding",
        "client_encoding" => matches!(v.as_str(), "utf8" | "utf-8" | "unicode"),
        _ => false,
    }
}

/// A lexer setting the server reports (ParameterStatus) with a value other than the guard's:
/// `Some(name)`. Checked when a connection opens and on every report afterwards, so that a
/// route to change them that the guard does not know still cannot go unnoticed.
pub fn unexpected_lexer_report(name: &str, value: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    (lexer_setting(&lower) && !lexer_value_ok(&lower, value)).then(|| format!("{lower} = {value}"))
}

/// rlsgate's own server-side prepared statements are named with this prefix.
pub const INTERNAL_STATEMENT_PREFIX: &str = "rg_";

/// `pg_temp`, `pg_temp_3`: the session's temporary schema.
pub fn is_temp_schema(name: &str) -> bool {
    let b = name.as_bytes();
    if b.len() < 7 || !b[..7].eq_ignore_ascii_case(b"pg_temp") {
        return false;
    }
    match &b[7..] {
        [] => true,
        [b'_', digits @ ..] => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_schema_names() {
        assert!(is_temp_schema("pg_temp"));
        assert!(is_temp_schema("PG_TEMP_12"));
        assert!(!is_temp_schema("pg_temp_"));
        assert!(!is_temp_schema("pg_temporary"));
        assert!(!is_temp_schema("public"));
    }

    #[test]
    fn unknown_statement_kinds_are_denied() {
        assert!(matches!(statement_kind("FutureStmt"), KindRule::Deny(_)));
        assert_eq!(statement_kind("SelectStmt"), KindRule::Allow);
        assert_eq!(statement_kind("CreateFunctionStmt"), KindRule::Code);
    }
}
