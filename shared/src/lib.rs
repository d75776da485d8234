//! What the `api` and the `sms-worker` both need: the `OtpRequested` event, configuration loading,
//! the AMQP topology, telemetry (logs and metrics), the HTTP server loop with its slow-client
//! limits, and the phone-number type and mask used in every log line.

pub mod amqp;
pub mod clock;
pub mod config;
pub mod event;
pub mod fraud_guard;
pub mod otp_keys;
pub mod phone;
pub mod redis_connection;
pub mod redis_script;
pub mod send_ledger;
pub mod serve;
pub mod telemetry;
pub mod topology;

pub use config::{CommonConfig, ConfigError, Env, LogFormat, QueueType};
pub use event::OtpRequested;
pub use phone::{PhoneNumber, mask_phone};
pub use topology::Topology;
