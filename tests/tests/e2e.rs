//! End to end: the real `api`, `sms-worker` and `fake-sms` binaries as separate processes,
//! talking over the real RabbitMQ, Redis and PostgreSQL. Also runs each `loadgen` scenario
//! briefly against that stack (a smoke test: no timing assertions).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::loadgen::{self, Args, Scenario};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(30);

fn binary(name: &str) -> PathBuf {
    tests::binaries::workspace_binary(name)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process whose stdout and stderr are collected.
struct Program {
    name: &'static str,
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Program {
    fn start(name: &'static str, path: PathBuf, env: &[(String, String)]) -> Self {
        let mut child = Command::new(&path)
            .env_clear()
            .envs(env.iter().cloned())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", path.display()));
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        Self {
            name,
            child,
            output,
        }
    }

    fn logs(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

struct Stack {
    namespace: String,
    database: String,
    api_url: String,
    sms_url: String,
    programs: Vec<Program>,
    client: reqwest::Client,
}

impl Stack {
    async fn start() -> Self {
        let namespace = format!("e2e_{}", uuid::Uuid::new_v4().simple());
        let database = format!("otp_test_{}", uuid::Uuid::new_v4().simple());
        let (api_port, sms_port, worker_port) = (free_port(), free_port(), free_port());
        let sms_url = format!("http://127.0.0.1:{sms_port}");
        let common = vec![
            ("NAMESPACE".to_owned(), namespace.clone()),
            ("AMQP_QUEUE_TYPE".to_owned(), "classic".to_owned()),
        ];
        let fake = Program::start(
            "fake-sms",
            PathBuf::from(env!("CARGO_BIN_EXE_fake-sms")),
            &[("FAKE_SMS_ADDR".to_owned(), format!("127.0.0.1:{sms_port}"))],
        );
        let mut api_env = common.clone();
        api_env.extend([
            ("API_ADDR".to_owned(), format!("127.0.0.1:{api_port}")),
            (
                "DATABASE_URL".to_owned(),
                format!("{}/{database}", tests::cleanup::POSTGRES),
            ),
            (
                "OTP_SECRET".to_owned(),
                "e2e-secret-0123456789abcdef".to_owned(),
            ),
            ("OTP_PER_IP_PER_HOUR".to_owned(), "1000000".to_owned()),
        ]);
        let api = Program::start("api", binary("api"), &api_env);
        let mut worker_env = common;
        worker_env.extend([
            ("WORKER_ADDR".to_owned(), format!("127.0.0.1:{worker_port}")),
            ("SMS_PROVIDER".to_owned(), "twilio".to_owned()),
            ("TWILIO_BASE_URL".to_owned(), sms_url.clone()),
            (
                "TWILIO_ACCOUNT_SID".to_owned(),
                tests::fake_sms::DEFAULT_ACCOUNT_SID.to_owned(),
            ),
            (
                "TWILIO_AUTH_TOKEN".to_owned(),
                tests::fake_sms::DEFAULT_AUTH_TOKEN.to_owned(),
            ),
            ("TWILIO_FROM".to_owned(), "+15005550006".to_owned()),
        ]);
        let worker = Program::start("sms-worker", binary("sms-worker"), &worker_env);
        let stack = Self {
            namespace,
            database,
            api_url: format!("http://127.0.0.1:{api_port}"),
            sms_url,
            programs: vec![fake, api, worker],
            client: reqwest::Client::new(),
        };
        for url in [
            format!("{}/readyz", stack.api_url),
            format!("http://127.0.0.1:{worker_port}/readyz"),
            format!("{}/messages", stack.sms_url),
        ] {
            stack
                .until(&format!("{url} to answer 200"), || async {
                    let ok = stack
                        .client
                        .get(&url)
                        .send()
                        .await
                        .ok()?
                        .status()
                        .is_success();
                    ok.then_some(())
                })
                .await;
        }
        stack
    }

    async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let started = Instant::now();
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if started.elapsed() > DEADLINE {
                for program in &self.programs {
                    eprintln!("--- {} ---\n{}", program.name, program.logs());
                }
                panic!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self, name: &str) -> String {
        self.programs
            .iter()
            .find(|p| p.name == name)
            .unwrap()
            .logs()
    }

    fn args(&self, scenario: Scenario) -> Args {
        let mut args = Args::for_scenario(scenario);
        args.api_url = self.api_url.clone();
        args.sms_url = self.sms_url.clone();
        args.namespace = self.namespace.clone();
        args.concurrency = 4;
        args
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for program in &mut self.programs {
            let _ = program.child.start_kill();
        }
        let (namespace, database) = (self.namespace.clone(), self.database.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                tests::cleanup::remove_namespace(&namespace).await;
                tests::cleanup::drop_database(&database).await;
            });
        })
        .join();
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

    let sms: Value = stack
        .until("the SMS at fake-sms", || async {
            let url = format!("{}/messages?to=%2B14155550123", stack.sms_url);
            let messages: Vec<Value> =
                stack.client.get(url).send().await.ok()?.json().await.ok()?;
            messages.into_iter().next()
        })
        .await;
    let body = sms["body"].as_str().unwrap();
    assert!(body.starts_with("Your Cheershare code is "), "{body}");
    let validity = sms["validity_period"].as_u64().unwrap();
    assert!((250..=300).contains(&validity), "ValidityPeriod {validity}");
    let code = loadgen::extract_code(body).expect("a code in the SMS");

    let session: Value = stack
        .client
        .post(format!("{}/v1/otp/verify", stack.api_url))
        .json(&json!({ "phone_number": phone, "otp": code }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = session["access_token"].as_str().expect("a session");
    let me: Value = stack
        .client
        .get(format!("{}/v1/me", stack.api_url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["phone_number"], phone);

    // One request id finds the sign-in in both programs' logs; no secret is in either.
    let worker_logs = stack
        .until("the worker to log the send", || async {
            let logs = stack.logs("sms-worker");
            logs.contains(&request_id).then_some(logs)
        })
        .await;
    let api_logs = stack.logs("api");
    assert!(
        api_logs.contains(&request_id),
        "api logs lack the request id"
    );
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
async fn loadgen_scenarios_run_against_the_stack() {
    let stack = Stack::start().await;
    for (scenario, count) in [
        (Scenario::Request, 20),
        (Scenario::Signup, 5),
        (Scenario::Verify, 10),
        (Scenario::Me, 20),
        (Scenario::Drain, 20),
    ] {
        let mut args = stack.args(scenario);
        args.count = Some(count);
        args.users = 2;
        let report = loadgen::run(args).await.unwrap();
        assert_eq!(report.ok, count, "{scenario:?}: {report}");
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
