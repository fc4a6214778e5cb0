//! `moai token USER [--doc D] [--table T] [--cojson] [--llm] [--read-only] [--ttl 1h]`: mints a connection token with the server's shared
//! secret, for scripts, tests and application servers that do not want to implement the HMAC
//! themselves. The token goes to stdout and nothing else does.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use moai_server::auth::Claims;
use moai_server::Auth;

use crate::cli::TokenArgs;

pub fn run(args: TokenArgs) -> anyhow::Result<ExitCode> {
    if args.secret.is_empty() {
        bail!("the shared secret is empty; set SYNC_SHARED_SECRET or --secret");
    }
    let exp = match args.ttl {
        Some(ttl) => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).context("system clock before 1970")?;
            Some((now + ttl).as_secs())
        }
        None => None,
    };
    let docs = (!args.docs.is_empty()).then_some(args.docs);
    let tables = if args.tables.is_empty() {
        None
    } else {
        Some(args.tables.iter().map(|spec| table_spec(spec)).collect::<anyhow::Result<BTreeMap<_, _>>>()?)
    };
    let claims =
        Claims { sub: args.user, exp, docs, tables, cojson: args.cojson, llm: args.llm, read_only: args.read_only };
    let token = Auth::with_secret(&args.secret).mint(&claims).context("minting the token")?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// `schema.table` or `schema.table WHERE predicate` (WHERE in any case).
fn table_spec(spec: &str) -> anyhow::Result<(String, Option<String>)> {
    let upper = spec.to_ascii_uppercase();
    let (table, predicate) = match upper.find(" WHERE ") {
        Some(i) => (spec[..i].trim(), Some(spec[i + " WHERE ".len()..].trim().to_owned())),
        None => (spec.trim(), None),
    };
    if table.split('.').count() != 2 || table.contains(char::is_whitespace) {
        bail!("--table {spec:?}: expected schema.table, optionally followed by WHERE and a predicate");
    }
    if predicate.as_deref() == Some("") {
        bail!("--table {spec:?}: WHERE without a predicate");
    }
    // A predicate the server cannot parse would make every session with this token fail.
    if let Err(e) = moai_pgsync::shape::Shape::parse(table, None, predicate.as_deref()) {
        bail!("--table {spec:?}: {e}");
    }
    Ok((table.to_owned(), predicate))
}

#[cfg(test)]
mod tests {
    use super::table_spec;

    #[test]
    fn table_specs() {
        assert_eq!(table_spec("public.todos").unwrap(), ("public.todos".into(), None));
        assert_eq!(
            table_spec("public.todos where owner_id = 'u1' AND done = false").unwrap(),
            ("public.todos".into(), Some("owner_id = 'u1' AND done = false".into()))
        );
        for bad in [
            "todos",
            "public.todos WHERE ",
            "a.b.c",
            "public. todos",
            "public.todos WHERE owner_id ==",
            "public.todos WHERE x = 'unterminated",
        ] {
            assert!(table_spec(bad).is_err(), "{bad}");
        }
    }
}
