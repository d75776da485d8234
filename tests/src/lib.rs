//! Test support: `fake-sms` (a Twilio Messages API stand-in), `loadgen`, and what every suite
//! under tests/tests shares: where the servers are ([`servers`]), waiting on a condition
//! ([`wait`]), programs as child processes ([`program`]), unique names and their removal
//! ([`cleanup`]), ports for programs to listen on ([`ports`]), a proxy to cut a server off ([`proxy`]), a throwaway Redis Cluster
//! ([`redis_cluster`]), and suites that need what a machine may lack ([`required`]).

pub mod binaries;
pub mod cleanup;
pub mod fake_sms;
pub mod loadgen;
pub mod ports;
pub mod program;
pub mod proxy;
pub mod redis_cluster;
pub mod required;
pub mod servers;
pub mod stack;
pub mod wait;
