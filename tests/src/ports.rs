//! Free TCP port selection on 127.0.0.1 for the servers the harness starts.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

use crate::scratch::random_u64;

/// Ports that servers may use. The range ends below Linux's default
/// ephemeral range (32768-60999), so outgoing connections never take a port
/// between the bind test and the server's own bind.
const FIRST_PORT: u16 = 20000;
const LAST_PORT: u16 = 31999;

/// Ports already handed out by this process. They are never handed out
/// again, so two tests in one process cannot race for the same port, even
/// after a server stopped and its port looks free.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Reserves `count` consecutive ports that are free on 127.0.0.1 and returns
/// the first one.
///
/// Another process can still bind a returned port before the server does, so
/// callers retry with a new port when the server reports "address in use".
pub fn reserve_consecutive_ports(count: u16) -> u16 {
    let span = u64::from(LAST_PORT - FIRST_PORT + 2 - count);
    for _ in 0..1000 {
        let first = FIRST_PORT + (random_u64() % span) as u16;
        let ports = first..first + count;
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if ports.clone().any(|port| handed_out.contains(&port)) {
            continue;
        }
        if ports.clone().all(is_free) {
            handed_out.extend(ports);
            return first;
        }
    }
    panic!("found no {count} consecutive free ports on 127.0.0.1 in {FIRST_PORT}-{LAST_PORT}");
}

fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}
