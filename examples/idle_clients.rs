//! Open N client connections to rlsgate (or any Postgres-wire server using cleartext password
//! auth), log each one in, and keep them all idle — connected, doing nothing — until SIGTERM
//! or SIGINT. Used by `scripts/soak.sh`.
//!
//! ```sh
//! IDLE_TOKEN=<jwt> cargo run --release --example idle_clients -- 127.0.0.1:6432 <db> 1000
//! ```
//!
//! Prints `connected <n>` once all logins are done (or failed), then `closed <n>` lines when
//! the server closes idle connections, and a summary line at exit:
//! `idle_clients: connected=<n> failed=<n> closed_by_server=<n>`. Exit status 1 if a login
//! failed or the server closed any connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Logins in flight at once.
const CONCURRENT_LOGINS: usize = 64;

fn startup(db: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608i32.to_be_bytes());
    for (k, v) in [
        ("user", "idle"),
        ("database", db),
        ("application_name", "idle_clients"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// Read one message: (tag, body).
async fn read_msg(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let len = usize::try_from(len - 4).map_err(|_| std::io::Error::other("bad length"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok((head[0], body))
}

async fn login(addr: &str, db: &str, token: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(&startup(db))
        .await
        .map_err(|e| format!("startup: {e}"))?;
    loop {
        let (tag, body) = read_msg(&mut s).await.map_err(|e| format!("login: {e}"))?;
        match tag {
            b'R' if body.get(..4) == Some(&3i32.to_be_bytes()[..]) => {
                let mut msg = vec![b'p'];
                msg.extend_from_slice(&((token.len() + 5) as i32).to_be_bytes());
                msg.extend_from_slice(token.as_bytes());
                msg.push(0);
                s.write_all(&msg)
                    .await
                    .map_err(|e| format!("password: {e}"))?;
            }
            b'R' if body.get(..4) == Some(&0i32.to_be_bytes()[..]) => {}
            b'R' => return Err("unsupported authentication request".into()),
            b'E' => {
                let text: Vec<String> = body
                    .split(|&b| b == 0)
                    .filter(|f| f.first().is_some_and(|&c| c == b'C' || c == b'M'))
                    .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                    .collect();
                return Err(format!("refused: {}", text.join(" ")));
            }
            b'Z' => return Ok(s),
            _ => {}
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: IDLE_TOKEN=<jwt> idle_clients <host:port> <database> <count>");
        std::process::exit(2);
    }
    let (addr, db) = (args[1].clone(), args[2].clone());
    let count: usize = args[3].parse().unwrap_or_else(|_| {
        eprintln!("count must be a number");
        std::process::exit(2)
    });
    let token = std::env::var("IDLE_TOKEN").unwrap_or_else(|_| {
        eprintln!("IDLE_TOKEN is not set");
        std::process::exit(2)
    });

    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_LOGINS));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for _ in 0..count {
        let (addr, db, token) = (addr.clone(), db.clone(), token.clone());
        let (connected, failed, closed) = (connected.clone(), failed.clone(), closed.clone());
        let (gate, done) = (gate.clone(), done_tx.clone());
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let result = tokio::time::timeout(Duration::from_secs(30), login(&addr, &db, &token))
                .await
                .unwrap_or_else(|_| Err("login timed out".into()));
            drop(permit);
            let mut s = match result {
                Ok(s) => s,
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("idle_clients: {e}");
                    }
                    let _ = done.send(());
                    return;
                }
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let _ = done.send(());
            // Idle: read only to notice the server closing the connection.
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let n = closed.fetch_add(1, Ordering::Relaxed) + 1;
                        println!("closed {n}");
                        return;
                    }
                    Ok(_) => {} // e.g. a ParameterStatus; still idle
                }
            }
        });
    }
    drop(done_tx);
    for _ in 0..count {
        if done_rx.recv().await.is_none() {
            break;
        }
    }
    println!("connected {}", connected.load(Ordering::Relaxed));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let (c, f, x) = (
        connected.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        closed.load(Ordering::Relaxed),
    );
    println!("idle_clients: connected={c} failed={f} closed_by_server={x}");
    std::process::exit(if f > 0 || x > 0 { 1 } else { 0 });
}
