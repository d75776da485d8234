//! Every connection is an open file.
//!
//! Each accepted connection holds a file descriptor, and so do the program's own connections
//! (PostgreSQL, Redis, RabbitMQ, the providers), its listeners and its log file. A service that
//! systemd starts gets a soft limit of 1,024 open files by default, under a hard limit far above
//! it (524,288 since systemd 240). Left there, a cap of 10,000 connections would never bite: a
//! flood of clients would take every descriptor first, and then the program's own connections
//! would fail with `EMFILE`, and every request with them, where the cap exists to make the flood
//! wait in the backlog instead. So at start the soft limit is raised to the hard one, as Go's
//! runtime does for every program, and a cap that still does not fit is lowered to what the
//! limit leaves, with a warning.

use super::ServerLimits;

/// Open files a program keeps for itself beside the connections it serves and the ones it opens
/// per request (the api's database pool, the worker's provider calls): Redis (one per node of a
/// cluster), RabbitMQ (and its replacement during a reconnect), its listeners, its log file and
/// the runtime's own. Both programs reserve it in [`ServerLimits::within_open_files`].
pub const OWN_OPEN_FILES: u64 = 64;

/// At most `wanted` connections, and no more than `open_files` leaves once `reserved` are kept
/// for the program's own use, each connection taking `files_each` (at least one connection, so
/// that a server still answers).
fn connections_within(wanted: usize, open_files: u64, reserved: u64, files_each: u64) -> usize {
    let room = (open_files.saturating_sub(reserved) / files_each.max(1)).max(1);
    usize::try_from(room).map_or(wanted, |room| wanted.min(room))
}

/// The soft limit of open files, raised first to the hard limit where it can be; `None` when it
/// cannot even be read.
fn open_files_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(open_files) => Some(open_files),
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
        }
    }
}

impl ServerLimits {
    /// These limits, with `max_connections` lowered if need be to what this process's open-file
    /// limit, raised first to its hard limit, leaves after `reserved` descriptors for the
    /// program's own connections and files, when each connection served takes `files_each` (2
    /// where handling a request may open a connection of its own). Logs a warning when it lowers
    /// the cap; keeps it as configured only when the limit cannot be read at all.
    pub fn within_open_files(self, reserved: u64, files_each: u64) -> Self {
        let Some(open_files) = open_files_limit() else {
            tracing::warn!(
                "could not read the open-file limit; HTTP_MAX_CONNECTIONS is kept as configured"
            );
            return self;
        };
        if open_files <= reserved {
            tracing::warn!(
                open_files,
                reserved,
                "the open-file limit is below what the program keeps for its own connections; raise LimitNOFILE (or ulimit -n), or lower DATABASE_POOL_SIZE or WORKER_CONCURRENCY"
            );
        }
        let max_connections =
            connections_within(self.max_connections, open_files, reserved, files_each);
        if max_connections < self.max_connections {
            tracing::warn!(
                configured = self.max_connections,
                open_files,
                reserved,
                max_connections,
                "HTTP_MAX_CONNECTIONS is more than the open-file limit leaves; serving fewer connections (raise LimitNOFILE, or ulimit -n, to serve more)"
            );
        }
        Self {
            max_connections,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::connections_within;

    #[test]
    fn a_cap_is_lowered_to_what_the_open_files_leave() {
        assert_eq!(connections_within(10_000, 1_024, 74, 1), 950);
        assert_eq!(connections_within(512, 1_024, 192, 1), 512);
        assert_eq!(connections_within(512, 1_024, 192, 2), 416);
        assert_eq!(connections_within(512, 524_288, 192, 2), 512);
        // Never none: a server that accepts nothing would look like one that is down.
        assert_eq!(connections_within(10_000, 64, 74, 1), 1);
        assert_eq!(connections_within(10_000, u64::MAX, 74, 1), 10_000);
    }
}
