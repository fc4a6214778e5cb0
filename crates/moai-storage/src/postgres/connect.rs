//! From a URL to a pool of connections, and the one way this backend names its server in logs
//! and errors: without the password.

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::config::Host;
use tokio_postgres::{Config, NoTls};

use super::PostgresOptions;
use crate::error::pg_detail;
use crate::StorageError;

/// Parses `url` and applies the options that belong to every connection. Returns the config and
/// the server's description without password.
pub(super) fn config(url: &str, options: &PostgresOptions) -> Result<(Config, String), StorageError> {
    // tokio-postgres' parse errors name the option, never its value: safe to show.
    let mut config =
        Config::from_str(url).map_err(|e| StorageError::PostgresConfig(format!("{} ({e})", redact_url(url))))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(options.connect_timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name("moai-storage");
    }
    if !options.fsync_every_commit {
        let mut startup = config.get_options().map(|o| format!("{o} ")).unwrap_or_default();
        startup.push_str("-c synchronous_commit=off");
        config.options(startup);
    }
    // A server that vanishes without closing the socket (a cut network) is noticed by the
    // kernel instead of after hours; the operation timeout bounds everything else.
    config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(15));
    let target = describe(&config);
    Ok((config, target))
}

pub(super) fn pool(config: Config, options: &PostgresOptions) -> Result<Pool, StorageError> {
    // Fast recycling: a pooled connection whose server went away is closed (tokio-postgres
    // notices the socket end) and is replaced; no test query per checkout.
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(options.pool_size.max(2))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.operation_timeout))
        .create_timeout(Some(options.connect_timeout))
        .recycle_timeout(Some(options.connect_timeout))
        .build()
        .map_err(|e| StorageError::PostgresConfig(format!("building the connection pool: {e}")))
}

/// A pool failure as a storage error. Closed pool: [`StorageError::Closed`].
pub(super) fn pool_error(target: &str, e: PoolError) -> StorageError {
    let reason = match e {
        PoolError::Closed => return StorageError::Closed,
        PoolError::Backend(e) => pg_detail(&e),
        other => other.to_string(),
    };
    StorageError::PostgresConnect { target: target.to_owned(), reason }
}

/// `postgres://user@host:port/db`, from what the connection will use (never the password).
fn describe(config: &Config) -> String {
    let user = config.get_user().unwrap_or_default();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config.get_ports().get(i).or(config.get_ports().first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(h) => format!("{h}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let db = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{}/{db}", hosts.join(","))
}

/// `url` with any password replaced by `***`, for logs: the URL form
/// (`postgres://user:secret@host/db` → `postgres://user:***@host/db`) and the key-value form
/// (`password=secret` → `password=***`). Whatever cannot be parsed is kept except the password.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        // The authority ends at the first '/', '?' or '#'; the user info at its last '@'.
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        let mut out = url[..scheme_end + 3].to_owned();
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        out.push_str(&redact_query(&rest[authority_end..]));
        return out;
    }
    redact_key_values(url)
}

/// `?…&password=secret…` → `?…&password=***…`.
fn redact_query(tail: &str) -> String {
    let Some(q) = tail.find('?') else { return tail.to_owned() };
    let (path, query) = tail.split_at(q + 1);
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect();
    format!("{path}{}", parts.join("&"))
}

/// `host=h password=secret` → `host=h password=***` (quoted values included).
fn redact_key_values(s: &str) -> String {
    let Some(start) = s.find("password") else { return s.to_owned() };
    let after = &s[start + "password".len()..];
    let Some(eq) = after.trim_start().strip_prefix('=') else { return s.to_owned() };
    let value = eq.trim_start();
    let value_len = if let Some(quoted) = value.strip_prefix('\'') {
        // Up to the closing quote (a backslash escapes one character).
        let mut chars = quoted.char_indices();
        let mut end = quoted.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '\'' => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        end + 1
    } else {
        value.find(char::is_whitespace).unwrap_or(value.len())
    };
    let value_start = s.len() - value.len();
    format!("{}***{}", &s[..value_start], redact_key_values(&s[value_start + value_len.min(value.len())..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive_redaction() {
        for (url, want) in [
            ("postgres://moai:s3cret@db:5432/app", "postgres://moai:***@db:5432/app"),
            ("postgresql://moai:p%40ss@db/app?sslmode=disable", "postgresql://moai:***@db/app?sslmode=disable"),
            ("postgres://moai@db/app", "postgres://moai@db/app"),
            ("postgres://db/app?user=moai&password=s3cret", "postgres://db/app?user=moai&password=***"),
            ("postgres://a:b@c@db/app", "postgres://a:***@db/app"),
            ("host=db user=moai password=s3cret dbname=app", "host=db user=moai password=*** dbname=app"),
            ("host=db password='s3 \\' cret' dbname=app", "host=db password=*** dbname=app"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn the_target_names_user_host_port_and_database_only() {
        let (_, target) = config("postgres://moai:s3cret@db.example:6543/app", &PostgresOptions::default()).unwrap();
        assert_eq!(target, "postgres://moai@db.example:6543/app");
        let err = config("postgres://moai:s3cret@db:notaport/app", &PostgresOptions::default()).err().unwrap();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
