//! The whole stack as separate processes: the real `fake-sms`, `api` and `sms-worker` binaries on
//! free 127.0.0.1 ports, talking over the real RabbitMQ, Redis and PostgreSQL under a namespace
//! and a database of their own, both removed when the [`Stack`] is dropped. Used by the `e2e`
//! and `browser` suites.

use serde_json::Value;

use crate::cleanup::{remove_now, unique};
use crate::loadgen::{Args, Scenario};
use crate::program::{Program, workspace_binary};
use crate::servers::servers;
use crate::wait::eventually;

/// Generous: three programs start and connect at once, beside the other suites.
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

pub use crate::ports::free_port;

/// `pairs` as a program's environment, with JSON logs (what production runs, and what the
/// test reads) filtered by `rust_log`.
pub fn env(
    pairs: impl IntoIterator<Item = (String, String)>,
    rust_log: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = pairs.into_iter().collect();
    env.extend([
        ("LOG_FORMAT".to_owned(), "json".to_owned()),
        ("RUST_LOG".to_owned(), rust_log.to_owned()),
    ]);
    env
}

pub fn pairs<const N: usize>(pairs: [(&str, String); N]) -> impl Iterator<Item = (String, String)> {
    pairs
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
}

pub struct Stack {
    pub namespace: String,
    pub database: String,
    pub api_url: String,
    /// fake-sms: `GET {sms_url}/messages?to=` lists what the worker sent.
    pub sms_url: String,
    pub callback_url: String,
    /// fake-sms, api and sms-worker, in that order.
    pub programs: Vec<Program>,
    pub client: reqwest::Client,
    /// The api's environment, to start it again ([`Stack::restart_api`]).
    api_env: Vec<(String, String)>,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(&[], "info").await
    }

    /// The stack with `api_vars` added to the api's environment, every program logging as
    /// `rust_log` says.
    pub async fn start_with(api_vars: &[(&str, &str)], rust_log: &str) -> Self {
        Self::start_on(&[], api_vars, rust_log).await
    }

    /// As [`Stack::start_with`], with `common_vars` in both the api's and the worker's
    /// environment (e.g. another `REDIS_URL`).
    pub async fn start_on(
        common_vars: &[(&str, &str)],
        api_vars: &[(&str, &str)],
        rust_log: &str,
    ) -> Self {
        let servers = servers().require_all();
        let namespace = unique("e2e");
        let database = unique("otp_test");
        let (api_port, sms_port, worker_port, callback_port) =
            (free_port(), free_port(), free_port(), free_port());
        let sms_url = format!("http://127.0.0.1:{sms_port}");
        let mut common = servers.env();
        common.extend(pairs([
            ("NAMESPACE", namespace.clone()),
            ("AMQP_QUEUE_TYPE", "classic".to_owned()),
        ]));
        // Last, so they override the defaults below in both programs.
        let overrides: Vec<(String, String)> = common_vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        // `cargo test` builds this package's programs for its integration tests into
        // target/<profile>, where the workspace's api and sms-worker are too.
        let fake = Program::start(
            &workspace_binary("fake-sms").await,
            &[],
            env(
                pairs([("FAKE_SMS_ADDR", format!("127.0.0.1:{sms_port}"))]),
                rust_log,
            ),
        );
        let api_env = common.iter().cloned().chain(pairs([
            ("API_ADDR", format!("127.0.0.1:{api_port}")),
            ("DATABASE_URL", servers.database_url(&database)),
            ("OTP_SECRET", "e2e-secret-0123456789abcdef".to_owned()),
            ("OTP_PER_IP_PER_HOUR", "1000000".to_owned()),
        ]));
        let api_env = api_env.chain(
            api_vars
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
        );
        let api_env = api_env.chain(overrides.iter().cloned());
        let api_env = env(api_env, rust_log);
        let api = Program::start_workspace("api", &[], api_env.clone()).await;
        let worker_env = common.into_iter().chain(pairs([
            ("WORKER_ADDR", format!("127.0.0.1:{worker_port}")),
            // As in production: two providers, delivery receipts on.
            ("SMS_PROVIDERS", "twilio,infobip".to_owned()),
            ("CALLBACK_ADDR", format!("127.0.0.1:{callback_port}")),
            (
                "CALLBACK_BASE_URL",
                format!("http://127.0.0.1:{callback_port}"),
            ),
            (
                "WORKER_SEAL_KEY",
                "ZTJlLXNlYWwta2V5LTAxMjM0NTY3ODlhYmNkZWYwMTI=".to_owned(),
            ),
            ("INFOBIP_BASE_URL", sms_url.clone()),
            ("INFOBIP_SENDER", "OTPAuth".to_owned()),
            (
                "INFOBIP_CLIENT_ID",
                crate::fake_sms::DEFAULT_INFOBIP_CLIENT_ID.to_owned(),
            ),
            (
                "INFOBIP_CLIENT_SECRET",
                crate::fake_sms::DEFAULT_INFOBIP_CLIENT_SECRET.to_owned(),
            ),
            ("TWILIO_BASE_URL", sms_url.clone()),
            (
                "TWILIO_ACCOUNT_SID",
                crate::fake_sms::DEFAULT_ACCOUNT_SID.to_owned(),
            ),
            (
                "TWILIO_AUTH_TOKEN",
                crate::fake_sms::DEFAULT_AUTH_TOKEN.to_owned(),
            ),
            ("TWILIO_FROM", "+15005550006".to_owned()),
        ]));
        let worker_env = worker_env.chain(overrides);
        let worker = Program::start_workspace("sms-worker", &[], env(worker_env, rust_log)).await;
        let stack = Self {
            namespace,
            database,
            api_url: format!("http://127.0.0.1:{api_port}"),
            sms_url,
            callback_url: format!("http://127.0.0.1:{callback_port}"),
            programs: vec![fake, api, worker],
            client: reqwest::Client::new(),
            api_env,
        };
        for url in [
            format!("{}/readyz", stack.api_url),
            format!("http://127.0.0.1:{worker_port}/readyz"),
            format!("{}/messages", stack.sms_url),
        ] {
            eventually(DEADLINE, &format!("{url} to answer 200"), || async {
                let response = stack.client.get(&url).send().await;
                response.is_ok_and(|r| r.status().is_success())
            })
            .await;
        }
        stack
    }

    /// Sends `request` and reads the answer as JSON.
    pub async fn json(&self, request: reqwest::RequestBuilder) -> Value {
        request
            .send()
            .await
            .expect("the stack answers")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// Starts a new api process in place of the one that ran (it must have exited, or been
    /// killed), on the same address and environment, and waits until it is ready.
    pub async fn restart_api(&mut self) {
        let api = Program::start_workspace("api", &[], self.api_env.clone()).await;
        self.programs[1] = api;
        let url = format!("{}/readyz", self.api_url);
        eventually(DEADLINE, "the new api to be ready", || async {
            let response = self.client.get(&url).send().await;
            response.is_ok_and(|r| r.status().is_success())
        })
        .await;
    }

    /// What the program called `name` (`fake-sms`, `api` or `sms-worker`) printed so far.
    pub fn logs(&self, name: &str) -> String {
        self.programs
            .iter()
            .find(|p| p.name() == name)
            .expect("a program of the stack")
            .logs()
    }

    /// `loadgen`'s arguments for `scenario` against this stack.
    pub fn args(&self, scenario: Scenario) -> Args {
        let mut args = Args::for_scenario(scenario);
        args.api_url = self.api_url.clone();
        args.sms_url = self.sms_url.clone();
        args.callback_url = self.callback_url.clone();
        args.amqp_url = servers().rabbitmq.url().to_owned();
        args.namespace = self.namespace.clone();
        args.concurrency = 4;
        args
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Stopped first, so no program declares again what the removal deletes.
        self.programs.clear();
        remove_now(&self.namespace, Some(&self.database));
    }
}
