//! A throwaway PostgreSQL cluster per test.
//!
//! `PgCluster::start()` runs `initdb` into a fresh temp dir and starts `postgres` on a free
//! 127.0.0.1 port with `wal_level = logical`, trust authentication (also for replication
//! connections) and its unix socket inside the temp dir. Dropping it stops the server with
//! `pg_ctl stop -m immediate` and deletes the directory.
//!
//! Binaries: `initdb`/`pg_ctl` from `$PG_BIN`, else from `PATH`, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian: `apt-get install postgresql`).
//!
//! Root: PostgreSQL refuses to run as root. When the test runs as root, every PostgreSQL
//! command is spawned with the uid/gid of the `postgres` system user (created by the Debian
//! package), falling back to `nobody`, via `CommandExt::uid/gid` (no `runuser`/`sudo` needed),
//! and the temp dir is chowned to that user. The temp dir lives under `/tmp` (short path for
//! the unix socket; the default temp dir may be mode 0700 for root only, ours is chowned).

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    run_as: Option<(u32, u32)>,
}

impl PgCluster {
    /// Start a new cluster with the default settings for these tests.
    pub fn start() -> PgCluster {
        Self::start_with(&[])
    }

    /// Start with extra `postgresql.conf` lines.
    pub fn start_with(extra_conf: &[&str]) -> PgCluster {
        Self::start_with_hba(extra_conf, &[])
    }

    /// Start with extra `postgresql.conf` lines and `pg_hba.conf` lines placed *before* the
    /// default trust rules (the first matching line wins), e.g. to require a password for one
    /// role: `host all syncer 127.0.0.1/32 scram-sha-256`.
    pub fn start_with_hba(extra_conf: &[&str], hba_first: &[&str]) -> PgCluster {
        let bin = find_bin_dir();
        let run_as = if unsafe_geteuid() == 0 { Some(unprivileged_user()) } else { None };
        let dir = tempfile::Builder::new().prefix("moai-pg-").tempdir_in("/tmp").expect("temp dir");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
        }
        let mut cluster = PgCluster { dir, bin, port: 0, run_as };
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"],
        );
        cluster.port = free_port();
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n\
             fsync = off\nfull_page_writes = off\nsynchronous_commit = on\n\
             shared_buffers = 64MB\nmax_connections = 100\nwal_sender_timeout = 60s\n\
             log_min_messages = warning\n",
            cluster.port,
            cluster.dir.path().display()
        );
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        append(&data.join("postgresql.conf"), &conf);
        if !hba_first.is_empty() {
            let hba = data.join("pg_hba.conf");
            let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
            let mut new = hba_first.join("\n");
            new.push('\n');
            new.push_str(&old);
            std::fs::write(&hba, new).expect("write pg_hba.conf");
        }
        // initdb's default pg_hba already trusts local and 127.0.0.1 replication; be explicit.
        append(
            &data.join("pg_hba.conf"),
            "\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        );
        cluster.pg_ctl_start();
        cluster
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A SQL connection to the cluster (its driver runs on the test's runtime).
    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    fn command(&self, prog: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(prog));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
            // HOME of root is not readable by the unprivileged user.
            cmd.env("HOME", self.dir.path());
        }
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn run(&self, prog: &str, args: &[&str]) -> Output {
        let out = self.command(prog).args(args).output().unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
        if !out.status.success() {
            panic!(
                "{prog} {args:?} failed: {}\nstdout: {}\nstderr: {}\nlog: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        out
    }

    fn pg_ctl_start(&self) {
        let data = self.data_dir();
        let log = self.log_file();
        // -w: pg_ctl returns once the server accepts connections.
        self.run("pg_ctl", &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60", "start"]);
    }

    /// Stop the server as a crash would (`-m immediate`): no shutdown checkpoint, connections
    /// are cut.
    pub fn stop_immediate(&self) {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
    }

    /// Restart (immediate stop, then start on the same port). Every connection breaks.
    pub fn restart(&self) {
        self.stop_immediate();
        self.pg_ctl_start();
    }

    pub fn start_again(&self) {
        self.pg_ctl_start();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.command("pg_ctl").args(["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]).output();
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).expect("open conf");
    f.write_all(text.as_bytes()).expect("write conf");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn unsafe_geteuid() -> u32 {
    // No libc dependency: the owner of /proc/self is the effective uid.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
}

/// (uid, gid) of `postgres`, else `nobody`, from /etc/passwd.
fn unprivileged_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[0] == name {
                if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                    return (uid, gid);
                }
            }
        }
    }
    (65534, 65534)
}

fn find_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return dir;
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found (initdb, pg_ctl): install the Debian package \
             `postgresql` (scripts/test does), or set PG_BIN"
        )
    })
}
