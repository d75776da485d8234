//! Test support: `fake-sms` (a Twilio Messages API stand-in) and helpers shared by the end-to-end
//! tests.

pub mod binaries;
pub mod cleanup;
pub mod fake_sms;
pub mod loadgen;
pub mod proxy;
