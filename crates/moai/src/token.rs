//! `moai token USER [--doc D] [--ttl 1h]`: mints a connection token with the server's shared
//! secret, for scripts, tests and application servers that do not want to implement the HMAC
//! themselves. The token goes to stdout and nothing else does.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

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
    let claims = Claims { sub: args.user, exp, docs };
    let token = Auth::with_secret(&args.secret).mint(&claims).context("minting the token")?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}
