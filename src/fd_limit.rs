//! Running out of file descriptors without going silent. At the process's open-files limit
//! `accept()` fails and clients would wait in the listen backlog until they time out; instead one
//! descriptor is kept in reserve, given up to accept the waiting client, which gets a clean
//! `FATAL 53300`, and taken back.

use std::fs::File;
use std::io;

/// Descriptors rlsgate needs besides one per client and one per upstream connection
/// (listeners, the audit sink, JWKS fetches, logs, the runtime's own).
const OVERHEAD: u64 = 64;

/// Raise the soft open-files limit to the hard one, and say so when `max_client_conn` clients
/// plus the pool cannot fit under it. Returns the soft limit in force.
pub fn prepare(max_client_conn: usize, pool_size: usize) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let soft: u64 = lim.rlim_cur;
    let needed = max_client_conn as u64 + pool_size as u64 + OVERHEAD;
    if needed > soft {
        tracing::warn!(
            open_files_limit = soft,
            max_client_conn,
            pool_size,
            "max_client_conn + pool_size needs about {needed} file descriptors but the open-files limit is {soft}: clients beyond it are refused with 53300 (raise the limit, e.g. LimitNOFILE=, or lower max_client_conn)"
        );
    }
    Some(soft)
}

/// Whether an accept error means the process (or system) is out of descriptors.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One descriptor held back for the moment the limit is reached.
pub struct Reserve(Option<File>);

impl Reserve {
    pub fn new() -> Reserve {
        Reserve(File::open("/dev/null").ok())
    }

    /// Give the descriptor up (to accept one client and refuse it).
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Take it back once the refused client is closed.
    pub fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = File::open("/dev/null").ok();
        }
    }
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve::new()
    }
}
