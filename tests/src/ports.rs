//! Ports for the programs a test starts. A test picks a port, then a program binds it, so the
//! port must stay free in between. `bind("127.0.0.1:0")` hands out a port from the kernel's
//! ephemeral range (32768–60999 here), the same range every outgoing connection of the suite
//! draws from: in the gap, one of those can take it, and the program fails with "address
//! already in use" (it happened in CI). So ports come from below that range, at random, and
//! never twice in one test binary.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// Below Linux's default ephemeral range, above the well-known servers' ports.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port nothing listens on now, not handed out before by this process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..1_000 {
        let port = rand::random_range(PORTS);
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port in {PORTS:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_outside_the_ephemeral_range() {
        let ports: HashSet<u16> = (0..200).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 200);
        assert!(ports.iter().all(|port| PORTS.contains(port)));
    }
}
