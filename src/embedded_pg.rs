//! Throwaway PostgreSQL clusters from local binaries, for `rlsgate demo` and the
//! integration tests. Blocking `std::process` code (wrap in `spawn_blocking`).
//!
//! Each cluster lives in a private temp dir (`rlsgate-pg-<pid>-<n>-<nanos>`, 0700)
//! holding `data/`, `postgres.log` (server stderr) and the unix socket. As root,
//! `initdb`/`postgres` run via `runuser -u postgres --` (or `nobody`); clients run
//! as the current user over the socket (`local all all trust`).
//!
//! The postmaster is started by an `sh` watchdog reading a pipe whose write end
//! only [`EmbeddedPg`] holds. When the pipe closes — [`EmbeddedPg::stop`], `Drop`,
//! or the owner dying in any way, even SIGKILL — the watchdog sends SIGINT (fast
//! shutdown), waits, and removes the temp dir: a cluster kept in a `static` never
//! outlives its test binary. [`EmbeddedPg::restart`] stops the postmaster with
//! `pg_ctl stop` and has the same watchdog start a new one.

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Errors from starting or using an embedded cluster. Messages carry the
/// command line, exit status and stderr or server-log tail.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No directory with PostgreSQL server binaries (`initdb`) was found.
    #[error("no PostgreSQL binaries (dir with `initdb`; set RLSGATE_PG_BIN); searched: {searched}")]
    NoBinaries { searched: String },
    /// A filesystem, process-spawning or input-validation step failed.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// A command (or the server) exited unsuccessfully.
    #[error("command failed: {cmd}\nstatus: {status}\noutput:\n{output}")]
    Command {
        cmd: String,
        status: String,
        output: String,
    },
    /// Something did not happen in time (e.g. the server never became ready).
    #[error("timed out: {what}")]
    Timeout { what: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
    let what = what.into();
    move |source| EmbeddedError::Io { what, source }
}

/// How to start an [`EmbeddedPg`]. `Default`: discovered binaries, a free
/// port, superuser `postgres`, `scram-sha-256` for TCP, no SSL.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Dir holding `initdb`, `postgres`, `psql`…; `None` = discover, in order:
    /// env `RLSGATE_PG_BIN`, `pg_config --bindir`, the highest
    /// `/usr/lib/postgresql/*/bin`, `initdb` on `PATH`. An explicitly given
    /// dir (field or env) without `initdb` is an error, not skipped.
    pub bin_dir: Option<PathBuf>,
    /// TCP port on 127.0.0.1; `None` = one that is free right now.
    pub port: Option<u16>,
    /// Bootstrap superuser role name.
    pub superuser: String,
    /// pg_hba method for the `host` lines (127.0.0.1/32 and ::1/128).
    pub tcp_auth: String,
    /// Extra lines appended to postgresql.conf (they win over ours).
    pub extra_conf: Vec<String>,
    /// Server certificate and key (PEM) copied into the data dir; sets `ssl=on`
    /// (plain TCP keeps working too).
    pub ssl: Option<(PathBuf, PathBuf)>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            bin_dir: None,
            port: None,
            superuser: "postgres".to_string(),
            tcp_auth: "scram-sha-256".to_string(),
            extra_conf: Vec::new(),
            ssl: None,
        }
    }
}

/// A running throwaway cluster. Stopped (and its temp dir removed) by
/// [`EmbeddedPg::stop`], on `Drop`, or when the owning process dies.
pub struct EmbeddedPg {
    bin_dir: PathBuf,
    dir: PathBuf,
    port: u16,
    superuser: String,
    /// When root: the (user, uid, gid) server binaries run as.
    run_as: Option<(String, u32, u32)>,
    pipe: Option<ChildStdin>,
    /// The watchdog's stdout: one postmaster pid per line (one per start).
    pids: Option<BufReader<ChildStdout>>,
    watchdog: Option<Child>,
    postmaster_pid: Option<i32>,
}

/// `pg_ctl stop -m <mode>`: how [`EmbeddedPg::restart`] shuts the server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Wait for clients to disconnect.
    Smart,
    /// Terminate sessions (each gets FATAL 57P01), checkpoint, exit.
    Fast,
    /// SIGQUIT everything, no checkpoint (crash recovery at the next start).
    Immediate,
}

impl ShutdownMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownMode::Smart => "smart",
            ShutdownMode::Fast => "fast",
            ShutdownMode::Immediate => "immediate",
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `$1` postgres binary, `$2` data dir, `$3` temp dir. Prints the postmaster
/// pid, then blocks until stdin reaches EOF. A `start` line on stdin (sent
/// once the postmaster was stopped) reaps it, starts a new one and prints its pid.
const WATCHDOG: &str = r#""$1" -D "$2" </dev/null >&2 &
pid=$!
echo "$pid"
while read -r line; do
  if [ "$line" = start ]; then
    wait "$pid"
    "$1" -D "$2" </dev/null >&2 &
    pid=$!
    echo "$pid"
  fi
done
kill -INT "$pid" 2>/dev/null
wait "$pid"
rm -rf "$3""#;

impl EmbeddedPg {
    /// `initdb` a fresh cluster in a new temp dir, start it and wait (≤ 30 s)
    /// until it accepts connections. On error nothing is left running.
    pub fn start(opts: EmbeddedOptions) -> Result<EmbeddedPg, EmbeddedError> {
        let bin_dir = find_bin_dir(opts.bin_dir.as_deref())?;
        let port = match opts.port {
            Some(p) => p,
            None => std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(io_err("picking a free port on 127.0.0.1"))?
                .port(),
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("rlsgate-pg-{}-{n}-{nanos}", std::process::id());
        let dir = std::env::temp_dir().join(name);
        let mkdir = fs::DirBuilder::new().mode(0o700).create(&dir);
        mkdir.map_err(io_err(format!("creating {}", dir.display())))?;
        let mut pg = EmbeddedPg {
            bin_dir,
            dir,
            port,
            superuser: opts.superuser.clone(),
            run_as: None,
            pipe: None,
            pids: None,
            watchdog: None,
            postmaster_pid: None,
        };
        // From here on, an early return drops `pg`, which stops the server and removes the dir.
        pg.run_as = run_as_user()?;
        pg.init_cluster(&opts)?;
        pg.launch()?;
        pg.wait_ready()?;
        tracing::info!(port, dir = %pg.dir.display(), "embedded PostgreSQL ready");
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server log (its stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// `program`, through `runuser -u <user> --` when root; cwd = the temp dir.
    fn server_command(&self, program: &Path) -> Command {
        let mut cmd = match &self.run_as {
            Some((user, _, _)) => {
                let known = ["/usr/sbin/runuser", "/sbin/runuser"];
                let runuser = known.into_iter().find(|p| Path::new(p).exists());
                let mut c = Command::new(runuser.unwrap_or("runuser"));
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.current_dir(&self.dir);
        cmd
    }

    fn chown(&self, path: &Path) -> Result<(), EmbeddedError> {
        let Some((user, uid, gid)) = &self.run_as else {
            return Ok(());
        };
        std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
            .map_err(io_err(format!("chown {} to {user}", path.display())))
    }

    fn init_cluster(&self, opts: &EmbeddedOptions) -> Result<(), EmbeddedError> {
        self.chown(&self.dir)?;
        let data = self.data_dir();
        let mut cmd = self.server_command(&self.bin("initdb"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-U", &opts.superuser, "-A", "trust"]);
        cmd.arg(format!("--auth-host={}", opts.tcp_auth));
        cmd.args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]);
        run_checked(&mut cmd, None)?;

        let mut conf = format!(
            "\n# rlsgate embedded_pg settings
listen_addresses = '127.0.0.1'
port = {}
unix_socket_directories = {}
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 64MB
password_encryption = 'scram-sha-256'
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
",
            self.port,
            quote_literal(&self.dir.to_string_lossy())
        );
        if let Some((cert, key)) = &opts.ssl {
            for (src, name) in [(cert, "server.crt"), (key, "server.key")] {
                let dst = data.join(name);
                let what = format!("copying {} to {}", src.display(), dst.display());
                fs::copy(src, &dst).map_err(io_err(what))?;
                self.chown(&dst)?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o600))
                    .map_err(io_err(format!("chmod 0600 {}", dst.display())))?;
            }
            conf.push_str("ssl = on\n");
        }
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(io_err(format!("appending to {}", conf_path.display())))?;

        // `host` lines match both TLS and plain connections.
        let m = &opts.tcp_auth;
        let hba = format!(
            "local all all trust\nhost all all 127.0.0.1/32 {m}\nhost all all ::1/128 {m}\n"
        );
        let hba_path = data.join("pg_hba.conf");
        fs::write(&hba_path, hba).map_err(io_err(format!("writing {}", hba_path.display())))
    }

    /// Spawn the watchdog (see module docs) and read the postmaster pid from it.
    fn launch(&mut self) -> Result<(), EmbeddedError> {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("creating {}", log_path.display())))?;
        self.chown(&log_path)?;
        let mut cmd = self.server_command(Path::new("sh"));
        cmd.args(["-c", WATCHDOG, "rlsgate-pg-watchdog"]);
        cmd.arg(self.bin("postgres"))
            .arg(self.data_dir())
            .arg(&self.dir);
        // Own process group: a terminal's Ctrl-C must not kill the watchdog
        // before it can shut the server down; the pipe drives shutdown.
        cmd.process_group(0);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        tracing::debug!(cmd = ?cmd, "starting postgres watchdog");
        let mut child = cmd.spawn().map_err(io_err(format!("spawning {cmd:?}")))?;
        self.pipe = child.stdin.take();
        self.pids = child.stdout.take().map(BufReader::new);
        self.watchdog = Some(child);
        self.read_postmaster_pid(&format!("{cmd:?}"))
    }

    /// The next pid line from the watchdog.
    fn read_postmaster_pid(&mut self, what: &str) -> Result<(), EmbeddedError> {
        let mut line = String::new();
        if let Some(out) = self.pids.as_mut() {
            out.read_line(&mut line)
                .map_err(io_err("reading the postmaster pid from the watchdog"))?;
        }
        let pid = line
            .trim()
            .parse::<i32>()
            .map_err(|_| EmbeddedError::Command {
                cmd: what.to_string(),
                status: format!("watchdog did not report a postmaster pid (got {line:?})"),
                output: self.log_tail(),
            })?;
        self.postmaster_pid = Some(pid);
        Ok(())
    }

    /// Run `pg_ctl -D <data dir> <args>` as the user the server runs as; returns stdout.
    /// Do not `start`/`restart` with it: the new postmaster would escape the watchdog (use
    /// [`EmbeddedPg::restart`]).
    pub fn pg_ctl(&self, args: &[&str]) -> Result<String, EmbeddedError> {
        let mut cmd = self.server_command(&self.bin("pg_ctl"));
        cmd.arg("-D").arg(self.data_dir()).args(args);
        run_checked(&mut cmd, None)
    }

    /// Stop the server with `pg_ctl stop -m <mode>` (waiting until it is gone), then start it
    /// again on the same port and data directory and wait (≤ 30 s) until it accepts
    /// connections. Every session open before is ended by the server.
    pub fn restart(&mut self, mode: ShutdownMode) -> Result<(), EmbeddedError> {
        self.pg_ctl(&["stop", "-w", "-t", "60", "-m", mode.as_str()])?;
        if let Some(pid) = self.postmaster_pid {
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let pipe = self.pipe.as_mut().ok_or_else(|| EmbeddedError::Io {
            what: "restart: the cluster was stopped".into(),
            source: io::Error::new(io::ErrorKind::NotConnected, "no watchdog"),
        })?;
        pipe.write_all(b"start\n")
            .and_then(|()| pipe.flush())
            .map_err(io_err("asking the watchdog to start postgres again"))?;
        self.read_postmaster_pid("watchdog restart")?;
        self.wait_ready()?;
        tracing::info!(
            port = self.port,
            mode = mode.as_str(),
            "embedded PostgreSQL restarted"
        );
        Ok(())
    }

    fn wait_ready(&self) -> Result<(), EmbeddedError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut cmd = Command::new(self.bin("pg_isready"));
        cmd.arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-q"]);
        loop {
            let status = cmd.status().map_err(io_err(format!("running {cmd:?}")))?;
            if status.success() {
                return Ok(());
            }
            if let Some(pid) = self.postmaster_pid.filter(|p| !process_alive(*p)) {
                return Err(EmbeddedError::Command {
                    cmd: format!("{:?} -D {:?}", self.bin("postgres"), self.data_dir()),
                    status: format!("postmaster (pid {pid}) exited during startup; server log:"),
                    output: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                let (port, log) = (self.port, self.log_tail());
                let what = format!(
                    "PostgreSQL on port {port} not ready after 30 s ({cmd:?}: {status})\nserver log tail:\n{log}"
                );
                return Err(EmbeddedError::Timeout { what });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Last 40 lines of the server log, for error messages.
    fn log_tail(&self) -> String {
        match fs::read(self.log_path()) {
            Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), 40),
            Err(e) => format!("(could not read {}: {e})", self.log_path().display()),
        }
    }

    /// TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the unix socket; use it as `host` for libpq clients.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a binary in the PostgreSQL bin dir, e.g. `bin("pgbench")`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Name of the bootstrap superuser role.
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    /// Run SQL (one or more statements, fed on stdin) through
    /// `psql -X -q -At -v ON_ERROR_STOP=1` as the superuser over the unix
    /// socket; returns stdout. Fails on the first SQL error.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, EmbeddedError> {
        let mut cmd = self.psql_command(db);
        cmd.args(["-f", "-"]);
        run_checked(&mut cmd, Some(sql.as_bytes()))
    }

    /// Like [`EmbeddedPg::psql`], running the SQL script `file`.
    pub fn psql_file(&self, db: &str, file: &Path) -> Result<String, EmbeddedError> {
        let mut cmd = self.psql_command(db);
        cmd.arg("-f").arg(file);
        run_checked(&mut cmd, None)
    }

    fn psql_command(&self, db: &str) -> Command {
        let mut cmd = self.client_command("psql");
        cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"]);
        cmd.args(["-U", &self.superuser, "-d", db]);
        cmd
    }

    /// `CREATE DATABASE name`; `name` must match `[a-z0-9_]+` (at most 63
    /// bytes), else an [`EmbeddedError::Io`] of kind `InvalidInput`.
    pub fn create_database(&self, name: &str) -> Result<(), EmbeddedError> {
        let ok_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
        if name.is_empty() || name.len() > 63 || !name.bytes().all(ok_byte) {
            return Err(EmbeddedError::Io {
                what: format!("create_database({name:?}): allowed names are [a-z0-9_]{{1,63}}"),
                source: io::Error::new(io::ErrorKind::InvalidInput, "invalid database name"),
            });
        }
        let sql = format!("CREATE DATABASE {};", quote_ident(name));
        self.psql("postgres", &sql).map(|_| ())
    }

    /// A `Command` for a client binary (`psql`, `pgbench`…) run as the current
    /// user, with `PGHOST`/`PGPORT` pointing at the unix socket and `PGUSER`
    /// set to the superuser (override with `-U`). Stray `PGSERVICE`,
    /// `PGOPTIONS`, `PGDATABASE`, `PGHOSTADDR` are removed.
    pub fn client_command(&self, bin_name: &str) -> Command {
        let mut cmd = Command::new(self.bin(bin_name));
        for var in ["PGSERVICE", "PGOPTIONS", "PGDATABASE", "PGHOSTADDR"] {
            cmd.env_remove(var);
        }
        cmd.env("PGHOST", &self.dir).env("PGUSER", &self.superuser);
        cmd.env("PGPORT", self.port.to_string());
        cmd
    }

    /// Fast shutdown: close the watchdog pipe, wait up to 10 s for the
    /// watchdog (then SIGQUIT the postmaster and kill the watchdog), remove
    /// the temp dir. Idempotent; also run on `Drop`.
    pub fn stop(&mut self) {
        drop(self.pipe.take());
        drop(self.pids.take());
        if let Some(mut child) = self.watchdog.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(25));
            }
            if !matches!(child.try_wait(), Ok(Some(_))) {
                tracing::warn!(
                    port = self.port,
                    "embedded PostgreSQL did not stop within 10 s; killing it"
                );
                if let Some(pid) = self.postmaster_pid {
                    // SAFETY: kill(2) has no memory-safety preconditions. The pid is
                    // still ours: the watchdog has not reaped the postmaster yet.
                    unsafe { libc::kill(pid, libc::SIGQUIT) };
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Usually already removed by the watchdog; errors are irrelevant here.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Quote an SQL identifier: wrap in `"` and double embedded `"`.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quote an SQL string literal: wrap in `'` and double embedded `'`
/// (standard_conforming_strings; no `E''` form).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run `cmd` to completion, feeding `input` on stdin; `Ok(stdout)` on success.
fn run_checked(cmd: &mut Command, input: Option<&[u8]>) -> Result<String, EmbeddedError> {
    tracing::debug!(cmd = ?cmd, "running");
    let stdin = input.map_or_else(Stdio::null, |_| Stdio::piped());
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("spawning {cmd:?}")))?;
    let stdin = child.stdin.take();
    // Write stdin on a thread while collecting output, so neither pipe can fill up and deadlock.
    let out = std::thread::scope(|s| {
        if let (Some(mut stdin), Some(data)) = (stdin, input) {
            // A write error (EPIPE if the child exits early) shows in its exit status.
            s.spawn(move || stdin.write_all(data));
        }
        child.wait_with_output()
    });
    let out = out.map_err(io_err(format!("waiting for {cmd:?}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = tail(&String::from_utf8_lossy(&out.stderr), 40);
    let output = match tail(&stdout, 20) {
        t if t.trim().is_empty() => stderr,
        t => format!("{stderr}\n(stdout tail)\n{t}"),
    };
    let (cmd, status) = (format!("{cmd:?}"), out.status.to_string());
    Err(EmbeddedError::Command {
        cmd,
        status,
        output,
    })
}

/// Find the PostgreSQL bin dir (order: see [`EmbeddedOptions::bin_dir`]).
fn find_bin_dir(explicit: Option<&Path>) -> Result<PathBuf, EmbeddedError> {
    let has_initdb = |d: &Path| d.join("initdb").is_file();
    let from_env = std::env::var_os("RLSGATE_PG_BIN").map(PathBuf::from);
    let given = [
        ("bin_dir option", explicit.map(PathBuf::from)),
        ("RLSGATE_PG_BIN", from_env),
    ];
    if let Some((label, d)) = given.into_iter().find_map(|(l, d)| Some((l, d?))) {
        let searched = format!("{label}={} (given, but no initdb)", d.display());
        return if has_initdb(&d) {
            Ok(d)
        } else {
            Err(EmbeddedError::NoBinaries { searched })
        };
    }
    let mut searched = vec!["bin_dir option and RLSGATE_PG_BIN (both unset)".to_string()];

    let mut pg_config = Command::new("pg_config");
    let out = pg_config.arg("--bindir").stderr(Stdio::null()).output();
    match out {
        Ok(o) if o.status.success() => {
            let d = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            if has_initdb(&d) {
                return Ok(d);
            }
            searched.push(format!("pg_config --bindir = {} (no initdb)", d.display()));
        }
        other => searched.push(format!("pg_config --bindir (failed: {other:?})")),
    }

    // Highest version first; non-numeric names ("common") are ignored.
    let entries = fs::read_dir("/usr/lib/postgresql").into_iter().flatten();
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, e.path().join("bin")))
        })
        .filter(|(_, d)| has_initdb(d))
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return Ok(d);
    }
    searched.push("/usr/lib/postgresql/*/bin (none with initdb)".into());

    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(d) = std::env::split_paths(&path).find(|d| has_initdb(d)) {
        // Resolve symlinks (e.g. /usr/local/bin/initdb) so sibling binaries are found.
        let real = fs::canonicalize(d.join("initdb"))
            .map_err(io_err(format!("resolving {}", d.join("initdb").display())))?;
        return Ok(real.parent().map_or(d, Path::to_path_buf));
    }
    searched.push(format!("initdb on PATH={}", path.to_string_lossy()));
    let searched = searched.join("; ");
    Err(EmbeddedError::NoBinaries { searched })
}

/// When root: the (user, uid, gid) to run server binaries as — `postgres` if
/// `getent passwd postgres` succeeds, else `nobody`. `None` when not root.
fn run_as_user() -> Result<Option<(String, u32, u32)>, EmbeddedError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for user in ["postgres", "nobody"] {
        let Ok(out) = Command::new("getent").args(["passwd", user]).output() else {
            continue;
        };
        let entry = String::from_utf8_lossy(&out.stdout).into_owned();
        let fields: Vec<&str> = entry.trim().split(':').collect();
        let id = |i: usize| fields.get(i).and_then(|s| s.parse::<u32>().ok());
        if let (true, Some(uid), Some(gid)) = (out.status.success(), id(2), id(3)) {
            return Ok(Some((user.to_string(), uid, gid)));
        }
    }
    Err(EmbeddedError::Io {
        what: "running as root, but `getent passwd` finds neither `postgres` nor `nobody` to run the server as".into(),
        source: io::Error::new(io::ErrorKind::NotFound, "no unprivileged user"),
    })
}

/// Whether `pid` is a live (non-zombie) process; assumed alive if /proc can't tell.
fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Format: "pid (comm) S ..."; comm may contain ')' so split at the last one.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z')),
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}
