//! At the process's open-files limit every client still gets an answer: a login, or a clean
//! `FATAL 53300` — never silence until it times out. (Its own test binary: it lowers the
//! process's limit.)

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

/// Open `n` connections at once from another process (its own descriptors), send each a
/// StartupMessage and classify the first reply: `R` (the login goes on), `E` + SQLSTATE, or
/// `silent` (nothing within 5 s). Prints one word per client.
const CLIENTS_PY: &str = r#"
import socket, struct, sys, time
port, n, db = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sys.stdin.readline()  # started before the proxy's limit is lowered; go
def startup():
    body = struct.pack('!i', 196608) + b'user\0app\0database\0' + db.encode() + b'\0\0'
    return struct.pack('!i', len(body) + 4) + body
socks = []
for _ in range(n):
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect(('127.0.0.1', port)); s.sendall(startup()); socks.append(s)
    except OSError as e:
        print('connect-failed', e); socks.append(None)
for s in socks:
    if s is None: continue
    try:
        data = b''
        while len(data) < 5:
            chunk = s.recv(4096)
            if not chunk: break
            data += chunk
        if data[:1] == b'R': print('R')
        elif data[:1] == b'E':
            fields = data[5:].split(b'\0')
            code = [f[1:].decode() for f in fields if f[:1] == b'C']
            print('E', code[0] if code else '?')
        else: print('closed' if not data else 'other')
    except socket.timeout:
        print('silent')
time.sleep(0.5)
"#;

/// Started before the limit is lowered (a child keeps the limit it was started with); runs
/// when `go` is called.
struct Clients(std::process::Child);

impl Clients {
    fn start(port: u16, n: usize, db: &str) -> Clients {
        let child = Command::new("python3")
            .args(["-c", CLIENTS_PY, &port.to_string(), &n.to_string(), db])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        Clients(child)
    }

    fn go(mut self) -> Vec<String> {
        use std::io::Write;
        if let Some(stdin) = self.0.stdin.as_mut() {
            let _ = stdin.write_all(b"go\n");
        }
        let out = self.0.wait_with_output().expect("clients");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_open_files_limit_are_refused_cleanly() {
    let proxy = start_proxy(2).await;
    // warm up: the pool and the cluster connections exist before the limit is lowered
    let c = client(&proxy, "north").await;
    c.simple_query("SELECT 1").await.expect("warm");
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let port = proxy.addr.port();
    let clients = Clients::start(port, 120, &proxy.db);
    // room for about 40 more descriptors (soft and hard: rlsgate raises soft to hard)
    let limit = open_fds() + 40;
    let lim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit reads the struct passed by pointer.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(set, 0, "lower RLIMIT_NOFILE");

    let replies = tokio::task::spawn_blocking(move || clients.go())
        .await
        .expect("clients");
    let logins = replies.iter().filter(|r| *r == "R").count();
    let refused = replies.iter().filter(|r| *r == "E 53300").count();
    assert_eq!(replies.len(), 120, "{replies:?}");
    assert!(
        logins + refused == 120,
        "every client gets a login or 53300: {replies:?}"
    );
    assert!(logins >= 10, "clients under the limit log in: {replies:?}");
    assert!(
        refused >= 10,
        "clients over the limit are refused: {replies:?}"
    );

    // the clients are gone: the proxy serves again
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = client(&proxy, "north").await;
    c.simple_query("SELECT 1")
        .await
        .expect("served after the burst");
    proxy.stop().await;
}
