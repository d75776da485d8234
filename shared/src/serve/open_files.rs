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

/// At most `wanted` connections, and no more than `open_files` leaves once `reserved` are kept
/// for the program's own use (at least one, so that a server still answers).
fn connections_within(wanted: usize, open_files: u64, reserved: u64) -> usize {
    let room = open_files.saturating_sub(reserved).max(1);
    usize::try_from(room).map_or(wanted, |room| wanted.min(room))
}

impl ServerLimits {
    /// These limits, with `max_connections` lowered if need be to what this process's open-file
    /// limit, raised first to its hard limit, leaves after `reserved` descriptors for the
    /// program's own connections and files. Logs a warning when it lowers the cap, and when the
    /// limit cannot be read or raised (the cap is then kept as configured).
    pub fn within_open_files(self, reserved: u64) -> Self {
        let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(open_files) => open_files,
            Err(e) => {
                tracing::warn!(error = %e, "could not read or raise the open-file limit; HTTP_MAX_CONNECTIONS is kept as configured");
                return self;
            }
        };
        let max_connections = connections_within(self.max_connections, open_files, reserved);
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
        assert_eq!(connections_within(10_000, 1_024, 74), 950);
        assert_eq!(connections_within(512, 1_024, 192), 512);
        assert_eq!(connections_within(512, 524_288, 192), 512);
        // Never none: a server that accepts nothing would look like one that is down.
        assert_eq!(connections_within(10_000, 64, 74), 1);
        assert_eq!(connections_within(10_000, u64::MAX, 74), 10_000);
    }
}
