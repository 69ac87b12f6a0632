//! `rlsgate token`: mint an HS256 development token.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Map, Value};

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// Environment variable holding the HS256 secret.
    #[arg(long)]
    pub secret_env: String,
    /// A claim `name=value` (repeatable). Integers and true/false become JSON numbers/booleans.
    #[arg(long = "claim", value_name = "NAME=VALUE")]
    pub claims: Vec<String>,
    /// Lifetime, e.g. 1h, 30m.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let secret = std::env::var(&args.secret_env)
        .with_context(|| format!("environment variable {} is not set", args.secret_env))?;
    let ttl: Duration = humantime::parse_duration(&args.ttl)
        .with_context(|| format!("invalid --ttl {:?}", args.ttl))?;
    let token = mint(&secret, &args.claims, ttl)?;
    println!("{token}");
    Ok(())
}

pub fn mint(secret: &str, claims: &[String], ttl: Duration) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    let mut map = Map::new();
    for c in claims {
        let Some((k, v)) = c.split_once('=') else {
            bail!("--claim must look like name=value, got {c:?}")
        };
        let value = if let Ok(n) = v.parse::<i64>() {
            Value::from(n)
        } else if v == "true" || v == "false" {
            Value::from(v == "true")
        } else {
            Value::from(v)
        };
        map.insert(k.to_string(), value);
    }
    map.entry("iat").or_insert(Value::from(now));
    map.entry("exp").or_insert(Value::from(now + ttl.as_secs()));
    Ok(crate::auth::mint_hs256(
        secret.as_bytes(),
        &Value::Object(map),
    )?)
}
