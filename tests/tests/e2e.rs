//! End to end: the real `api`, `sms-worker` and `fake-sms` binaries as separate processes,
//! talking over the real RabbitMQ, Redis and PostgreSQL: a sign-in, the same at `RUST_LOG=trace`
//! (whose logs must hold no secret either), and each `loadgen` scenario briefly against that
//! stack (a smoke test: no timing assertions).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tests::cleanup::{remove_now, unique};
use tests::loadgen::{self, Args, Scenario};
use tests::program::Program;
use tests::servers::servers;
use tests::wait::eventually;

/// Generous: three programs start and connect at once, beside the other suites.
const DEADLINE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("a bound address")
        .port()
}

/// `pairs` as a program's environment, with JSON logs (what production runs, and what the
/// test reads) filtered by `rust_log`.
fn env(pairs: impl IntoIterator<Item = (String, String)>, rust_log: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = pairs.into_iter().collect();
    env.extend([
        ("LOG_FORMAT".to_owned(), "json".to_owned()),
        ("RUST_LOG".to_owned(), rust_log.to_owned()),
    ]);
    env
}

fn pairs<const N: usize>(pairs: [(&str, String); N]) -> impl Iterator<Item = (String, String)> {
    pairs
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
}

struct Stack {
    namespace: String,
    database: String,
    api_url: String,
    sms_url: String,
    callback_url: String,
    programs: Vec<Program>,
    client: reqwest::Client,
}

impl Stack {
    async fn start() -> Self {
        Self::start_with(&[], "info").await
    }

    /// The stack with `api_vars` added to the api's environment, every program logging as
    /// `rust_log` says.
    async fn start_with(api_vars: &[(&str, &str)], rust_log: &str) -> Self {
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
        let fake = Program::start(
            Path::new(env!("CARGO_BIN_EXE_fake-sms")),
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
        let api = Program::start_workspace("api", &[], env(api_env, rust_log)).await;
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
                tests::fake_sms::DEFAULT_INFOBIP_CLIENT_ID.to_owned(),
            ),
            (
                "INFOBIP_CLIENT_SECRET",
                tests::fake_sms::DEFAULT_INFOBIP_CLIENT_SECRET.to_owned(),
            ),
            ("TWILIO_BASE_URL", sms_url.clone()),
            (
                "TWILIO_ACCOUNT_SID",
                tests::fake_sms::DEFAULT_ACCOUNT_SID.to_owned(),
            ),
            (
                "TWILIO_AUTH_TOKEN",
                tests::fake_sms::DEFAULT_AUTH_TOKEN.to_owned(),
            ),
            ("TWILIO_FROM", "+15005550006".to_owned()),
        ]));
        let worker = Program::start_workspace("sms-worker", &[], env(worker_env, rust_log)).await;
        let stack = Self {
            namespace,
            database,
            api_url: format!("http://127.0.0.1:{api_port}"),
            sms_url,
            callback_url: format!("http://127.0.0.1:{callback_port}"),
            programs: vec![fake, api, worker],
            client: reqwest::Client::new(),
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
    async fn json(&self, request: reqwest::RequestBuilder) -> Value {
        request
            .send()
            .await
            .expect("the stack answers")
            .json()
            .await
            .expect("a JSON answer")
    }

    fn logs(&self, name: &str) -> String {
        self.programs
            .iter()
            .find(|p| p.name() == name)
            .expect("a program of the stack")
            .logs()
    }

    fn args(&self, scenario: Scenario) -> Args {
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

#[tokio::test]
async fn sign_in_across_api_worker_and_fake_sms() {
    let stack = Stack::start().await;
    let phone = "+14155550123";
    let request_id = format!("e2e-{}", uuid::Uuid::new_v4().simple());
    let reply = stack
        .client
        .post(format!("{}/v1/otp", stack.api_url))
        .header("x-request-id", &request_id)
        .json(&json!({ "phone_number": phone }))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);

    let sms: Value = eventually(DEADLINE, "the SMS at fake-sms", || async {
        let url = format!("{}/messages?to=%2B14155550123", stack.sms_url);
        let messages: Vec<Value> = stack.client.get(url).send().await.ok()?.json().await.ok()?;
        messages.into_iter().next()
    })
    .await;
    let body = sms["body"].as_str().unwrap();
    assert!(body.starts_with("Your Cheershare code is "), "{body}");
    let validity = sms["validity_period"].as_u64().unwrap();
    assert!((250..=300).contains(&validity), "ValidityPeriod {validity}");
    let code = loadgen::extract_code(body).expect("a code in the SMS");

    let verify = stack
        .client
        .post(format!("{}/v1/otp/verify", stack.api_url))
        .json(&json!({ "phone_number": phone, "otp": code }));
    let session = stack.json(verify).await;
    let token = session["access_token"].as_str().expect("a session");
    let me = stack.client.get(format!("{}/v1/me", stack.api_url));
    let me = stack.json(me.bearer_auth(token)).await;
    assert_eq!(me["phone_number"], phone);

    // One request id finds the sign-in in both programs' logs; no secret is in either.
    let worker_logs = eventually(DEADLINE, "the worker to log the send", || async {
        let logs = stack.logs("sms-worker");
        logs.contains(&request_id).then_some(logs)
    })
    .await;
    // Both programs write logs from a background thread: wait for the line, do not race it.
    let api_logs = eventually(DEADLINE, "the api logs to carry the request id", || async {
        let logs = stack.logs("api");
        logs.contains(&request_id).then_some(logs)
    })
    .await;
    for logs in [&api_logs, &worker_logs] {
        assert!(
            logs.lines()
                .all(|l| l.trim().is_empty() || l.starts_with('{')),
            "JSON logs"
        );
        for secret in [code.as_str(), token, phone, &phone[1..]] {
            assert!(!logs.contains(secret), "a log holds {secret}");
        }
    }
}

#[tokio::test]
async fn logs_at_trace_hold_no_code_token_or_full_number() {
    // Ten-digit codes: a six-digit one could turn up by chance among the numbers of a trace log.
    let mut stack = Stack::start_with(&[("OTP_LENGTH", "10")], "trace").await;
    let phone = "+14155550124";
    let api = |path: &str| stack.client.post(format!("{}{path}", stack.api_url));
    let sent = stack
        .json(api("/v1/otp").json(&json!({ "phone_number": phone })))
        .await;
    let challenge_id = &sent["challenge_id"];
    let sms: Value = eventually(DEADLINE, "the SMS at fake-sms", || async {
        let url = format!("{}/messages?to=%2B14155550124", stack.sms_url);
        let messages: Vec<Value> = stack.client.get(url).send().await.ok()?.json().await.ok()?;
        messages.into_iter().next()
    })
    .await;
    let code = loadgen::extract_code(sms["body"].as_str().unwrap()).expect("a code in the SMS");
    assert_eq!(code.len(), 10);

    let verify = json!({ "phone_number": phone, "otp": code, "challenge_id": challenge_id });
    let session = stack.json(api("/v1/otp/verify").json(&verify)).await;
    let secret = |session: &Value, name: &str| session[name].as_str().expect(name).to_owned();
    let me = stack.client.get(format!("{}/v1/me", stack.api_url));
    let me = stack
        .json(me.bearer_auth(secret(&session, "access_token")))
        .await;
    assert_eq!(me["phone_number"], phone);
    let refresh = json!({ "refresh_token": secret(&session, "refresh_token") });
    let rotated = stack.json(api("/v1/token/refresh").json(&refresh)).await;
    let logout = api("/v1/logout").bearer_auth(secret(&rotated, "access_token"));
    assert_eq!(logout.send().await.unwrap().status(), 204);

    // Stopped, so every line they wrote has been read.
    let mut logs = Vec::new();
    for program in stack.programs.iter_mut().filter(|p| p.name() != "fake-sms") {
        program.terminate();
        assert!(program.wait(DEADLINE).await.success(), "{}", program.name());
        logs.push((program.name().to_owned(), program.logs()));
    }
    // The Infobip callback URL's secret follows `secret=`; the Twilio auth token also signs
    // the delivery receipts this run received.
    let mut secrets = vec![
        code.clone(),
        phone.to_owned(),
        phone[1..].to_owned(),
        tests::fake_sms::DEFAULT_AUTH_TOKEN.to_owned(),
        "secret=".to_owned(),
    ];
    for session in [&session, &rotated] {
        secrets.push(secret(session, "access_token"));
        secrets.push(secret(session, "refresh_token"));
    }
    let api_logs = &logs[0].1;
    assert!(
        api_logs.contains(r#""level":"DEBUG""#),
        "the api logs below info: {api_logs}"
    );
    for (name, logs) in &logs {
        for line in logs.lines().filter(|l| !l.trim().is_empty()) {
            let entry: Value = serde_json::from_str(line).expect("JSON logs");
            // Other crates log AMQP frames, HTTP bodies and headers below info: never shown.
            let target = entry["target"].as_str().unwrap_or_default();
            let krate = target.split("::").next().unwrap_or_default();
            if matches!(entry["level"].as_str(), Some("DEBUG" | "TRACE")) {
                assert!(
                    ["api", "sms_worker", "shared", "tower_http"].contains(&krate),
                    "{name} logged below info for {target}: {line}"
                );
            }
            for secret in &secrets {
                assert!(
                    !line.contains(secret.as_str()),
                    "{name} logged {secret}: {line}"
                );
            }
        }
    }
}

#[tokio::test]
async fn loadgen_scenarios_run_against_the_stack() {
    let stack = Stack::start().await;
    for (scenario, count) in [
        (Scenario::Request, 20),
        (Scenario::Signup, 5),
        (Scenario::Verify, 10),
        (Scenario::Me, 20),
        (Scenario::Drain, 20),
        (Scenario::Receipts, 20),
        (Scenario::Resend, 5),
    ] {
        let mut args = stack.args(scenario);
        args.count = Some(count);
        args.users = 2;
        let report = loadgen::run(args).await.unwrap();
        // `receipts` posts two callbacks (sent, delivered) per message.
        let expected = if scenario == Scenario::Receipts {
            count * 2
        } else {
            count
        };
        assert_eq!(report.ok, expected, "{scenario:?}: {report}");
        assert!(report.errors.is_empty(), "{scenario:?}: {report}");
        assert!(report.throughput_per_sec > 0.0);
        if matches!(scenario, Scenario::Request | Scenario::Signup) {
            assert_eq!(report.undelivered, Some(0), "{report}");
            assert_eq!(
                report.delivery.as_ref().map(|d| d.count),
                Some(count as usize),
                "{report}"
            );
        }
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["latency"].is_object() || scenario == Scenario::Drain);
    }
}
