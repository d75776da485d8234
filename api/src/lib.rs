//! The `api` program: phone sign-in with one-time passwords, opaque bearer tokens and the
//! middleware that authenticates protected routes. See SPEC §3.

pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod otp;
pub mod phone;
pub mod publisher;
pub mod request_id;
pub mod routes;
pub mod startup;
pub mod state;
pub mod tokens;

pub use config::ApiConfig;
pub use startup::Application;
