//! End to end: the real `api`, `sms-worker` and `fake-sms` binaries as separate processes,
//! talking over the real RabbitMQ, Redis and PostgreSQL: a sign-in, the same at `RUST_LOG=trace`
//! (whose logs must hold no secret either), and each `loadgen` scenario briefly against that
//! stack (a smoke test: no timing assertions).

use serde_json::{Value, json};
use tests::loadgen::{self, Scenario};
use tests::servers::servers;
use tests::stack::{DEADLINE, Stack};
use tests::wait::eventually;

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

    let sms = first_sms_to(&stack, phone).await;
    let body = sms["body"].as_str().unwrap();
    assert!(body.starts_with("Your sign-in code is "), "{body}");
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
    let sms = first_sms_to(&stack, phone).await;
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

/// The api's publish reaches the broker, but the broker's replies are held back on the way to the
/// api (the worker's own connection is untouched): the worker sends the SMS while the api never
/// hears the confirm. At its deadline the api finds the worker's record in the send ledger, so
/// the event was stored after all: the request is accepted, and the code in the SMS works.
#[tokio::test]
async fn a_request_whose_confirm_never_came_is_accepted_when_a_worker_took_its_event() {
    let (broker, amqp_url) = tests::proxy::TcpProxy::in_front_of(&servers().rabbitmq).await;
    let stack = Stack::start_with(&[("AMQP_URL", &amqp_url)], "info").await;
    let phone = "+14155550125";

    broker.hold_replies();
    let reply = stack
        .client
        .post(format!("{}/v1/otp", stack.api_url))
        .json(&json!({ "phone_number": phone }))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202, "{:?}", reply.text().await);
    broker.release_replies();

    let api_logs = eventually(DEADLINE, "the api to log how it settled", || async {
        let logs = stack.logs("api");
        logs.contains("a worker has the event").then_some(logs)
    })
    .await;
    assert!(
        !api_logs.contains("withdrawn before any worker"),
        "{api_logs}"
    );
    signs_in_with_the_sms(&stack, phone).await;
}

/// As above, but the worker is paused until the api has settled the request: no worker took the
/// event, so the api withdraws it and refuses the request. The worker, resumed, finds the
/// event withdrawn and acknowledges it without an SMS; the number may ask again at once, since
/// the request gave its limit slots back, and that code arrives and works.
#[tokio::test]
async fn a_request_whose_confirm_never_came_is_withdrawn_when_no_worker_took_its_event() {
    let (broker, amqp_url) = tests::proxy::TcpProxy::in_front_of(&servers().rabbitmq).await;
    // A resend gap longer than the test: the number is accepted again only if the refused
    // request gave its slots back.
    let stack = Stack::start_with(
        &[("AMQP_URL", &amqp_url), ("OTP_RESEND_SECS", "3600")],
        "info",
    )
    .await;
    let worker = &stack.programs[2];
    assert_eq!(worker.name(), "sms-worker");
    let phone = "+14155550126";
    let request = || {
        stack
            .client
            .post(format!("{}/v1/otp", stack.api_url))
            .json(&json!({ "phone_number": phone }))
            .send()
    };

    worker.pause();
    broker.hold_replies();
    let refused = request().await.unwrap();
    broker.release_replies();
    worker.resume();
    assert_eq!(refused.status(), 503, "{:?}", refused.text().await);

    eventually(
        DEADLINE,
        "the worker to acknowledge the withdrawn event",
        || async {
            stack
                .logs("sms-worker")
                .contains("the api withdrew this event")
        },
    )
    .await;
    let url = format!("{}/messages?to=%2B14155550126", stack.sms_url);
    let sent: Vec<Value> = stack
        .json(stack.client.get(url))
        .await
        .as_array()
        .unwrap()
        .clone();
    assert!(sent.is_empty(), "no SMS for the withdrawn event: {sent:?}");

    eventually(DEADLINE, "the same number to be accepted again", || async {
        let status = request().await.map(|reply| reply.status());
        assert!(
            !matches!(status, Ok(reqwest::StatusCode::TOO_MANY_REQUESTS)),
            "the refused request kept its slots"
        );
        status.is_ok_and(|status| status == 202)
    })
    .await;
    signs_in_with_the_sms(&stack, phone).await;
}

/// The api killed (SIGKILL, the OOM killer) after its publish reached the broker and before it
/// could make the code current: the worker sends the SMS all the same. The api that replaces
/// it finds the code still pending when the user signs in with it, sees in the send ledger that
/// its SMS went, and makes it current: the user is not left with a code that never works.
#[tokio::test]
async fn a_code_whose_api_was_killed_before_making_it_current_works_when_its_user_signs_in() {
    let (broker, amqp_url) = tests::proxy::TcpProxy::in_front_of(&servers().rabbitmq).await;
    let mut stack = Stack::start_with(&[("AMQP_URL", &amqp_url)], "info").await;
    let phone = "+14155550127";

    broker.hold_replies();
    let request = stack
        .client
        .post(format!("{}/v1/otp", stack.api_url))
        .json(&json!({ "phone_number": phone }))
        .send();
    let killed_waiting = tokio::spawn(request);
    // The worker has the event and sent it while the api still waits for the confirm.
    first_sms_to(&stack, phone).await;
    stack.programs[1].kill().await;
    assert!(
        killed_waiting.await.expect("the request task").is_err(),
        "the client heard nothing: the api died waiting for the confirm"
    );
    broker.release_replies();

    stack.restart_api().await;
    signs_in_with_the_sms(&stack, phone).await;
    eventually(
        DEADLINE,
        "the new api to log the late promotion",
        || async {
            stack
                .logs("api")
                .contains("a sign-in found a code that was sent but not yet made current")
        },
    )
    .await;
}

/// The code in the first SMS to `phone` opens a session.
async fn signs_in_with_the_sms(stack: &Stack, phone: &str) {
    let sms = first_sms_to(stack, phone).await;
    let code =
        loadgen::extract_code(sms["body"].as_str().expect("a body")).expect("a code in the SMS");
    let verify = stack
        .client
        .post(format!("{}/v1/otp/verify", stack.api_url))
        .json(&json!({ "phone_number": phone, "otp": code }));
    let session = stack.json(verify).await;
    assert!(session["access_token"].as_str().is_some(), "{session}");
}

/// The first SMS fake-sms received for `phone`, once it has.
async fn first_sms_to(stack: &Stack, phone: &str) -> Value {
    eventually(DEADLINE, "the SMS at fake-sms", || async {
        let url = format!(
            "{}/messages?to={}",
            stack.sms_url,
            phone.replace('+', "%2B")
        );
        let messages: Vec<Value> = stack.client.get(url).send().await.ok()?.json().await.ok()?;
        messages.into_iter().next()
    })
    .await
}
