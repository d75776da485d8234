//! The `api` program: phone sign-in with one-time passwords, opaque bearer tokens and the
//! middleware that authenticates protected routes (docs/api.md).
//!
//! Where things are: [`config`] reads the environment once; `startup` builds the
//! [`Application`]; `router` lists the routes and the middleware stack, whose functions live in
//! `middleware`, `request_id`, `auth` (bearer tokens) and `error` (the one place errors become
//! HTTP); `routes/` holds the handlers and `signin/` the sign-in rules; `otp` keeps codes in
//! Redis, `limits` the velocity limits and the fraud guard, `client_ip` finds the caller, `db` every SQL
//! statement, `tokens` the token format, `phone` number normalisation, `publisher` the
//! confirmed publish to RabbitMQ; `jobs` runs migrations and the token purge in the background;
//! `openapi` the document `docs` shows, `demo` the optional sign-in page. The server loop with its
//! slow-client limits is `shared::serve`, which the worker's ports use too.

mod auth;
mod client_ip;
pub mod config;
mod db;
mod demo;
mod detached;
mod docs;
mod error;
mod extract;
mod jobs;
mod limits;
mod locale;
mod metrics;
mod middleware;
mod openapi;
mod otp;
mod phone;
mod publisher;
mod request_id;
mod router;
mod routes;
mod signin;
mod startup;
mod state;
mod tokens;

pub use config::ApiConfig;
pub use startup::Application;
pub use state::AppState;
