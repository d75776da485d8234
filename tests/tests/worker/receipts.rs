//! Delivery receipts over real HTTP, with fake-sms as the carrier: signed Twilio callbacks
//! accepted and forged ones refused, Infobip reports only with the URL's secret, duplicates and
//! late statuses ignored, one resend through the other provider for a carrier-side failure of a
//! code that is still valid (and none otherwise), a failed resend's refusal logged without the
//! code it echoes, the breaker opening on receipts alone, and `sms-worker trace` telling the
//! story.

use std::sync::Arc;
use std::time::Duration;

use shared::fraud_guard::{FraudGuard, FraudGuardMode, FraudGuardPolicy, GuardVerdict, GuardZone};
use shared::{OtpRequested, PhoneNumber, QueueType};
use sms_worker::trace::{Line, Timelines, What};
use tests::fake_sms::{
    Carrier, Faults, InjectedResponse, Outcome, Rule, SmsProvider, twilio_signature,
};
use tests::proxy::TcpProxy;
use tests::servers::servers;
use tests::wait::eventually;

use crate::harness::{
    CODE_VALIDITY, Harness, RunningWorker, WAIT, event, pairs, phone, with_harness,
};

/// The value of `name` in `overrides`.
fn setting<'a>(overrides: &'a [(String, String)], name: &str) -> &'a str {
    overrides
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_default()
}

/// The number's timeline as the worker keeps it.
async fn timeline(h: &Harness, overrides: &[(String, String)], to: &str) -> Vec<Line> {
    let config = h.config(&pairs(overrides));
    let redis =
        shared::redis_connection::RedisConnection::new(&config.common.redis).expect("Redis");
    let timelines = Timelines::new(redis, &h.ns, config.seal_key.map(Arc::new));
    timelines
        .read(&PhoneNumber::parse(to).expect("a number"))
        .await
        .expect("the timeline")
}

/// Lines of the timeline of `to` that are `what`.
async fn lines_of(h: &Harness, overrides: &[(String, String)], to: &str, what: What) -> Vec<Line> {
    timeline(h, overrides, to)
        .await
        .into_iter()
        .filter(|line| line.what == what)
        .collect()
}

/// Waits until the carrier's callbacks to `to` include a final one the worker answered 204.
async fn wait_for_final_callback(h: &Harness, to: &str, provider: SmsProvider) {
    eventually(
        WAIT,
        &format!("a final {provider:?} callback for {to}"),
        || async {
            h.fake.callbacks_sent().iter().any(|c| {
                c.to == to
                    && c.provider == provider
                    && matches!(c.status.as_str(), "delivered" | "undelivered" | "failed")
                    && c.answer == Some(204)
            })
        },
    )
    .await;
}

/// The form of Twilio's callback saying message `sid` to `to` was dropped by the carrier (30007).
fn dropped_callback(h: &Harness, sid: &str, to: &str) -> Vec<(String, String)> {
    [
        ("AccountSid", h.fake.config().account_sid.as_str()),
        ("MessageSid", sid),
        ("MessageStatus", "undelivered"),
        ("ErrorCode", "30007"),
        ("To", to),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// Posts `form` to the Twilio callback `url`, signed with fake-sms's auth token as Twilio signs,
/// with `idempotency` as its `I-Twilio-Idempotency-Token`; the worker's answer.
async fn post_signed(
    h: &Harness,
    url: &str,
    form: &[(String, String)],
    idempotency: Option<&str>,
) -> reqwest::StatusCode {
    let signature = twilio_signature(&h.fake.config().auth_token, url, form);
    let mut request = h
        .http
        .post(url)
        .form(form)
        .header("X-Twilio-Signature", signature);
    if let Some(token) = idempotency {
        request = request.header("I-Twilio-Idempotency-Token", token);
    }
    request.send().await.expect("an answer").status()
}

/// Sends one SMS to `to` whose code the api holds; returns the event.
async fn send_held(h: &Harness, to: &str) -> OtpRequested {
    let event = event(to, CODE_VALIDITY);
    h.hold_code(&event).await;
    h.publish(&event).await;
    event
}

#[tokio::test]
async fn signed_callbacks_are_applied_and_forged_ones_refused() {
    with_harness(QueueType::Classic, |h| async move {
        let overrides = h.receipts();
        let base = setting(&overrides, "CALLBACK_BASE_URL").to_owned();
        let _worker = h.start_worker(&pairs(&overrides)).await;
        let to = phone();
        send_held(&h, &to).await;
        wait_for_final_callback(&h, &to, SmsProvider::Twilio).await;
        let sid = h.fake.messages(Some(&to))[0].sid.clone();
        let receipts = lines_of(&h, &overrides, &to, What::Receipt).await;
        let statuses: Vec<_> = receipts.iter().filter_map(|l| l.status.as_deref()).collect();
        // `queued` is what the send's answer already said: only later statuses are news.
        assert_eq!(statuses, ["sent", "delivered"], "{receipts:?}");

        // A genuine-looking callback saying the message was dropped, signed several wrong ways.
        let url = format!("{base}/v1/callbacks/twilio");
        let params = dropped_callback(&h, &sid, &to);
        let token = h.fake.config().auth_token.clone();
        let post = |target: String, form: Vec<(String, String)>, signature: Option<String>| {
            let mut request = h.http.post(target).form(&form);
            if let Some(signature) = signature {
                request = request.header("X-Twilio-Signature", signature);
            }
            async move { request.send().await.expect("the callback listener answers") }
        };
        let wrong_key = twilio_signature("not-the-auth-token", &url, &params);
        let mut changed = params.clone();
        changed[2].1 = "failed".to_owned();
        let signed_for_other_url =
            twilio_signature(&token, "https://attacker.example/v1/callbacks/twilio", &params);
        let signed = twilio_signature(&token, &url, &params);
        let forged = [
            post(url.clone(), params.clone(), None).await,
            post(url.clone(), params.clone(), Some(wrong_key)).await,
            post(url.clone(), changed, Some(signed.clone())).await,
            post(url.clone(), params.clone(), Some(signed_for_other_url)).await,
            // A valid signature replayed to another URL of ours.
            post(format!("{url}?replayed=1"), params.clone(), Some(signed.clone())).await,
            // No HMAC-SHA1 at all: refused before the form is read.
            post(url.clone(), params.clone(), Some("AAAA".to_owned())).await,
        ];
        for response in forged {
            assert_eq!(response.status(), 403);
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
        }
        // Infobip's endpoint without the secret, or with a wrong one.
        let report = serde_json::json!({"results": [{"messageId": sid, "status": {"groupName": "UNDELIVERABLE", "id": 4}}]});
        for target in [
            format!("{base}/v1/callbacks/infobip"),
            format!("{base}/v1/callbacks/infobip?secret=00000000000000000000000000000000"),
        ] {
            let response = h.http.post(target).json(&report).send().await.expect("an answer");
            assert_eq!(response.status(), 403);
        }
        // Far more than a callback: refused before anyone parses or signs it.
        let mut padded = params.clone();
        padded.push(("Padding".to_owned(), "x".repeat(20_000)));
        let response = post(url.clone(), padded, Some(signed.clone())).await;
        assert_eq!(response.status(), 413);
        // Garbage with the right content type but no signature, and the wrong content type.
        let response = h
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), 415);

        // Nothing forged changed anything: still delivered, nothing resent.
        let receipts = lines_of(&h, &overrides, &to, What::Receipt).await;
        assert_eq!(receipts.len(), 2, "{receipts:?}");
        assert_eq!(h.fake.messages(Some(&to)).len(), 1);

        // The correctly signed one is accepted (and, delivered being final, changes nothing).
        let response = post(url.clone(), params.clone(), Some(signed.clone())).await;
        assert_eq!(response.status(), 204);
        assert_eq!(lines_of(&h, &overrides, &to, What::Receipt).await.len(), 2);
        assert_eq!(h.fake.messages(Some(&to)).len(), 1);
        // Replayed with made-up idempotency tokens, which the signature does not cover: it
        // moves nothing, so it writes nothing.
        let markers = || async {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:sent:*:seen:*", h.ns))
                .query_async(&mut h.redis().await)
                .await
                .expect("KEYS");
            keys.len()
        };
        let before = markers().await;
        for n in 0..5 {
            let token = format!("made-up-{n}");
            let answer = post_signed(&h, &url, &params, Some(&token)).await;
            assert_eq!(answer, 204);
        }
        assert_eq!(markers().await, before);
    })
    .await;
}

#[tokio::test]
async fn duplicate_and_out_of_order_receipts_change_nothing() {
    with_harness(QueueType::Classic, |h| async move {
        let overrides = h.receipts();
        let _worker = h.start_worker(&pairs(&overrides)).await;
        // Every callback three times, and `delivered` before `sent`.
        h.fake.set_carrier(Carrier {
            delay_ms: 20,
            duplicates: 2,
            reorder: true,
            ..Carrier::default()
        });
        let to = phone();
        send_held(&h, &to).await;
        eventually(WAIT, "all nine callbacks answered", || async {
            let answered: Vec<_> = h
                .fake
                .callbacks_sent()
                .into_iter()
                .filter(|c| c.to == to)
                .collect();
            answered.len() == 9 && answered.iter().all(|c| c.answer == Some(204))
        })
        .await;
        let receipts = lines_of(&h, &overrides, &to, What::Receipt).await;
        let statuses: Vec<_> = receipts
            .iter()
            .filter_map(|l| l.status.as_deref())
            .collect();
        // The late `sent` and every repeat were no-ops.
        assert_eq!(statuses, ["delivered"], "{receipts:?}");
    })
    .await;
}

/// With Infobip's idempotency enabled, a second request with a message id it has taken is
/// refused as it is processed, and the refusal comes as a delivery report under that same id
/// (`REJECTED_DUPLICATE_MESSAGE_ID`, status 23). It says nothing of the message sent first: it
/// must neither fail it (a resend through the next provider, the very second SMS idempotency is
/// for) nor, as a final status, keep the message's real outcome from being recorded.
#[tokio::test]
async fn infobips_report_of_a_duplicate_request_leaves_the_message_alone() {
    with_harness(QueueType::Classic, |h| async move {
        let mut overrides = h.receipts();
        overrides.push(("SMS_PROVIDERS".to_owned(), "infobip,twilio".to_owned()));
        let worker = h.start_worker(&pairs(&overrides)).await;
        // The carrier's own report comes well after the duplicate's.
        h.fake.set_carrier(Carrier {
            delay_ms: 3_000,
            ..Carrier::default()
        });
        // By difference: the in-process workers of the tests alongside share one recorder.
        let refused_repeats = async || {
            let series =
                r#"sms_receipts_ignored_total{provider="infobip",reason="duplicate_request"} "#;
            h.metrics(&worker)
                .await
                .lines()
                .find_map(|line| line.strip_prefix(series))
                .map_or(0, |n| n.trim().parse::<u64>().expect("a count"))
        };
        let before = refused_repeats().await;
        let to = phone();
        send_held(&h, &to).await;
        let sent = eventually(WAIT, "the SMS through Infobip", || async {
            h.fake.messages(Some(&to)).into_iter().next()
        })
        .await;
        assert_eq!(sent.provider, SmsProvider::Infobip);
        let url = sent.callback_url.expect("Infobip was given a report URL");
        let duplicate = serde_json::json!({"results": [{
            "messageId": sent.sid,
            "to": to.trim_start_matches('+'),
            "status": {"groupId": 5, "groupName": "REJECTED", "id": 23, "name": "REJECTED_DUPLICATE_MESSAGE_ID"},
            "error": {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR", "permanent": false},
        }]});
        // Once the worker has recorded the message: a report it cannot match yet is asked
        // about again, which would only delay the same answer.
        eventually(WAIT, "the worker answers the duplicate's report", || async {
            let response = h.http.post(&url).json(&duplicate).send().await.ok()?;
            (response.status() == 204).then_some(())
        })
        .await;
        wait_for_final_callback(&h, &to, SmsProvider::Infobip).await;
        let receipts = lines_of(&h, &overrides, &to, What::Receipt).await;
        let statuses: Vec<_> = receipts
            .iter()
            .filter_map(|l| l.status.as_deref())
            .collect();
        assert_eq!(statuses.last(), Some(&"delivered"), "{receipts:?}");
        assert!(!statuses.contains(&"failed"), "{receipts:?}");
        assert_eq!(lines_of(&h, &overrides, &to, What::Resent).await, []);
        assert_eq!(h.fake.messages(Some(&to)).len(), 1, "no second SMS");
        assert_eq!(refused_repeats().await, before + 1, "counted");
    })
    .await;
}

/// Sends an SMS, held, to a new number, which Twilio's carrier drops (30007) at once, with
/// `slow` answering each send `latency_ms` late; returns the number.
async fn dropped_by_twilio(h: &Harness, slow: SmsProvider, latency_ms: u64) -> String {
    h.fake.set_faults_for(slow, Faults::latency(latency_ms));
    let to = phone();
    h.fake.set_carrier(Carrier {
        delay_ms: 20,
        outcomes: vec![Outcome::new(&to, "undelivered", Some(30007)).via(SmsProvider::Twilio)],
        ..Carrier::default()
    });
    send_held(h, &to).await;
    to
}

/// A carrier's final report that comes before the worker has recorded the message (here the
/// provider answers the send a second after accepting it, and the carrier reports at once) is
/// asked about again until the record is there: a dropped code is resent, a delivery counted. Before, it was
/// ignored as a message not ours (Twilio sends a callback only once), and a retried Twilio
/// callback passed for a repeat of the first.
#[tokio::test]
async fn a_receipt_that_comes_before_its_record_is_still_applied() {
    with_harness(QueueType::Classic, |h| async move {
        let overrides = h.receipts();
        let worker = h.start_worker(&pairs(&overrides)).await;
        let to = dropped_by_twilio(&h, SmsProvider::Twilio, 1_000).await;
        // The dropped code, resent through the other provider.
        h.wait_for_messages(&to, 2).await;
        wait_for_final_callback(&h, &to, SmsProvider::Twilio).await;
        // The carrier reported the failure while the send was still unanswered.
        let first = h
            .fake
            .callbacks_sent()
            .into_iter()
            .find(|c| c.to == to && c.status == "undelivered")
            .expect("the carrier's failure report");
        let answered = h.fake.requests(Some(&to))[0]
            .responded_at
            .expect("the send was answered");
        assert!(
            first.at < answered,
            "{first:?} came after the send's answer {answered}"
        );
        let messages = h.fake.messages(Some(&to));
        assert_eq!(messages[1].provider, SmsProvider::Infobip, "{messages:?}");
        let resent = lines_of(&h, &overrides, &to, What::Resent).await;
        assert_eq!(resent.len(), 1, "{resent:?}");

        // A delivery reported as early is applied too (the breaker weighs deliveries against
        // failures); the `queued` and `sent` before it are not waited for.
        let delivered_to = phone();
        send_held(&h, &delivered_to).await;
        wait_for_final_callback(&h, &delivered_to, SmsProvider::Twilio).await;
        let receipts = lines_of(&h, &overrides, &delivered_to, What::Receipt).await;
        let statuses: Vec<_> = receipts
            .iter()
            .filter_map(|l| l.status.as_deref())
            .collect();
        assert_eq!(statuses, ["delivered"], "{receipts:?}");
        worker.stop().await;
    })
    .await;
}

/// A resend slower than its callback request's 15 s timeout still completes, even when the
/// worker is told to stop meanwhile: the receipt's status is stored first, so the provider's
/// retry of it would change nothing; the resend runs on a task of its own, which the stopping
/// worker waits for. Before, the request's timeout cut the resend off with it, and it was lost.
#[tokio::test]
async fn a_resend_outlasting_its_callback_request_completes_even_through_a_stop() {
    with_harness(QueueType::Classic, |h| async move {
        let mut overrides = h.receipts();
        overrides.push(("SEND_TIMEOUT_SECS".to_owned(), "30".to_owned()));
        let mut worker = h.start_worker_process(&pairs(&overrides)).await;
        let to = dropped_by_twilio(&h, SmsProvider::Infobip, 20_000).await;
        eventually(
            Duration::from_secs(40),
            "the carrier's report cut off by the request timeout",
            || async {
                h.fake
                    .callbacks_sent()
                    .iter()
                    .any(|c| c.to == to && c.status == "undelivered" && c.answer == Some(408))
            },
        )
        .await;
        assert_eq!(
            h.fake.requests(Some(&to)).len(),
            2,
            "the resend is under way"
        );
        worker.terminate();
        let exit = worker.wait(Duration::from_secs(45)).await;
        assert_eq!(exit.code(), Some(0), "{}", worker.logs());
        let resent = lines_of(&h, &overrides, &to, What::Resent).await;
        assert_eq!(resent.len(), 1, "{resent:?}\n{}", worker.logs());
        assert_eq!(resent[0].status.as_deref(), Some("accepted"), "{resent:?}");
        assert_eq!(h.fake.messages(Some(&to)).len(), 2);
    })
    .await;
}

/// A failure receipt whose first copy was stored while Redis's answer was lost (the worker
/// answered 503) still earns its resend when the provider sends it again. Before, the retry found
/// the status already final and changed nothing: the code was never resent.
#[tokio::test]
async fn a_failure_receipt_sent_again_after_a_lost_answer_still_earns_its_resend() {
    with_harness(QueueType::Classic, |h| async move {
        let (redis, redis_url) = TcpProxy::in_front_of(&servers().redis).await;
        let mut overrides = h.receipts();
        overrides.push(("REDIS_URL".to_owned(), redis_url));
        let base = setting(&overrides, "CALLBACK_BASE_URL").to_owned();
        let worker = h.start_worker(&pairs(&overrides)).await;
        // The test is the carrier here.
        h.fake.set_carrier(Carrier {
            mute: true,
            ..Carrier::default()
        });
        let to = phone();
        send_held(&h, &to).await;
        h.wait_for_messages(&to, 1).await;
        let sid = h.fake.messages(Some(&to))[0].sid.clone();
        let status_key = format!("{}:sent:{{twilio:{sid}}}:status", h.ns);
        let status = || async {
            let status: Option<String> = redis::cmd("HGET")
                .arg(&status_key)
                .arg("s")
                .query_async(&mut h.redis().await)
                .await
                .expect("HGET");
            status
        };
        eventually(WAIT, "the message recorded for its receipts", || async {
            status().await.is_some()
        })
        .await;

        let url = format!("{base}/v1/callbacks/twilio");
        let params = dropped_callback(&h, &sid, &to);
        // Twilio's retry of a callback carries the same idempotency token.
        let post = || post_signed(&h, &url, &params, Some("the-same-callback"));
        // The carrier's `sent` first, as it comes: the worker's script is then loaded in Redis
        // (a script not yet loaded would not run at all while the replies are held).
        let mut sent = params.clone();
        sent.retain(|(name, _)| name != "ErrorCode");
        sent[2].1 = "sent".to_owned();
        assert_eq!(post_signed(&h, &url, &sent, None).await, 204);
        assert_eq!(status().await.as_deref(), Some("sent"));
        redis.hold_replies();
        assert_eq!(post().await, 503);
        redis.release_replies();
        assert_eq!(status().await.as_deref(), Some("undelivered"), "stored");
        let owed = || async {
            let owed: bool = redis::cmd("HEXISTS")
                .arg(&status_key)
                .arg("o")
                .query_async(&mut h.redis().await)
                .await
                .expect("HEXISTS");
            owed
        };
        assert!(owed().await, "its resend still owed");
        assert_eq!(h.fake.messages(Some(&to)).len(), 1, "nothing resent yet");

        eventually(WAIT, "the callback sent again to be taken", || async {
            post().await == 204
        })
        .await;
        h.wait_for_messages(&to, 2).await;
        let messages = h.fake.messages(Some(&to));
        assert_eq!(messages[1].provider, SmsProvider::Infobip, "{messages:?}");
        assert_eq!(messages[0].body, messages[1].body, "the same code, resent");
        let resent = lines_of(&h, &overrides, &to, What::Resent).await;
        assert_eq!(resent.len(), 1, "{resent:?}");
        // Settled: once more is a plain no-op.
        assert!(!owed().await, "the resend is marked settled");
        assert_eq!(post().await, 204);
        assert_eq!(h.fake.messages(Some(&to)).len(), 2);
        worker.stop().await;
    })
    .await;
}

/// With no other provider configured, a dropped code's resend is skipped for good: marked
/// settled, so repeats of its receipt are plain no-ops. Before, it stayed owed for a day, and
/// every repeat asked Redis and the breakers again.
#[tokio::test]
async fn a_resend_with_no_other_provider_configured_is_settled() {
    with_harness(QueueType::Classic, |h| async move {
        let mut overrides = h.receipts();
        overrides.push(("SMS_PROVIDERS".to_owned(), "twilio".to_owned()));
        let _worker = h.start_worker(&pairs(&overrides)).await;
        let to = phone();
        h.fake.set_carrier(Carrier {
            delay_ms: 20,
            outcomes: vec![Outcome::new(&to, "undelivered", Some(30007))],
            ..Carrier::default()
        });
        send_held(&h, &to).await;
        wait_for_final_callback(&h, &to, SmsProvider::Twilio).await;
        let not_resent = lines_of(&h, &overrides, &to, What::NotResent).await;
        assert_eq!(not_resent.len(), 1, "{not_resent:?}");
        let detail = not_resent[0].detail.as_deref().unwrap_or_default();
        assert!(detail.contains("no other provider"), "{detail}");
        let sid = h.fake.messages(Some(&to))[0].sid.clone();
        let owed: bool = redis::cmd("HEXISTS")
            .arg(format!("{}:sent:{{twilio:{sid}}}:status", h.ns))
            .arg("o")
            .query_async(&mut h.redis().await)
            .await
            .expect("HEXISTS");
        assert!(!owed, "settled");
        assert_eq!(h.fake.messages(Some(&to)).len(), 1);
    })
    .await;
}

#[tokio::test]
async fn an_undelivered_30007_is_resent_once_through_the_second_provider() {
    with_harness(QueueType::Classic, |h| async move {
        let overrides = h.receipts();
        let _worker = h.start_worker(&pairs(&overrides)).await;
        let to = phone();
        // Both carriers drop it, each report arriving three times: one resend, never two.
        h.fake.set_carrier(Carrier {
            delay_ms: 20,
            duplicates: 2,
            outcomes: vec![Outcome::new(&to, "undelivered", Some(30007))],
            ..Carrier::default()
        });
        let event = send_held(&h, &to).await;
        wait_for_final_callback(&h, &to, SmsProvider::Infobip).await;
        let messages = h.fake.messages(Some(&to));
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert_eq!(messages[0].provider, SmsProvider::Twilio);
        assert_eq!(messages[1].provider, SmsProvider::Infobip);
        assert_eq!(messages[0].body, messages[1].body, "the same code, resent");
        let resent = lines_of(&h, &overrides, &to, What::Resent).await;
        assert_eq!(resent.len(), 1, "{resent:?}");
        assert_eq!(resent[0].provider.as_deref(), Some("infobip"));
        let not_resent = lines_of(&h, &overrides, &to, What::NotResent).await;
        assert_eq!(not_resent.len(), 1, "Infobip's failure: {not_resent:?}");

        // The operator's view of the whole story, from the program.
        let out = h.trace(&to, &pairs(&overrides)).await;
        for expected in [
            shared::mask_phone(&to).as_str(),
            &format!("event {}", event.event_id),
            "requested",
            "tried twilio: accepted",
            "ended: sent",
            "receipt from twilio: undelivered, error 30007",
            "resent through infobip: accepted",
            "receipt from infobip: undelivered, error 30007",
            "not resent: this event was resent already",
        ] {
            assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
        }
        let code = event.otp.as_deref().expect("a code");
        assert!(!out.contains(code), "the code leaked:\n{out}");
        assert!(!out.contains(&to[2..]), "the number leaked:\n{out}");
    })
    .await;
}

/// A resend is a second paid SMS: in `enforce`, a country the fraud guard holds tripped gets
/// none, so a carrier in on SMS pumping, reporting its numbers' codes undelivered, earns no second
/// SMS. The worker asks the guard without counting in it: a resent code that is then used must
/// not weigh as an unused one. In `monitor` the resend is made, and both are counted
/// (`sms_resend_fraud_guard_trips_total`), so that what monitoring costs shows.
#[tokio::test]
async fn a_country_the_fraud_guard_holds_gets_no_resend_and_resends_count_nothing() {
    with_harness(QueueType::Classic, |h| async move {
        let guard_settings = [
            ("OTP_FRAUD_GUARD", "enforce"),
            ("OTP_FRAUD_GUARD_MIN_UNVERIFIED", "2"),
        ];
        let mut overrides = h.receipts();
        overrides.extend(guard_settings.map(|(n, v)| (n.to_owned(), v.to_owned())));
        let worker = h.start_worker(&pairs(&overrides)).await;
        // The api's side of the guard: codes sent to the US, counted as the api counts them (in
        // `monitor`, so that each counts whatever the guard says). The worker places each
        // number itself: it must find the zone the api counts in.
        let policy = FraudGuardPolicy {
            mode: FraudGuardMode::Monitor,
            ..FraudGuardPolicy::from_env(&shared::Env::from_pairs(guard_settings))
                .expect("the guard's settings")
        };
        let guard = FraudGuard::new(&h.ns);
        let config = h.config(&pairs(&overrides));
        let redis =
            || shared::redis_connection::RedisConnection::new(&config.common.redis).expect("Redis");
        let (first, second) = (phone(), phone());
        let us = GuardZone::of(&PhoneNumber::parse(&first).expect("E.164")).expect("placed");
        assert_eq!(us.to_string(), "US");
        let api_sends = || async { guard.send(redis(), &policy, us).await.expect("the guard") };

        h.fake.set_carrier(Carrier {
            delay_ms: 20,
            outcomes: vec![
                Outcome::new(&first, "undelivered", Some(30007)),
                Outcome::new(&second, "undelivered", Some(30007)),
            ],
            ..Carrier::default()
        });
        // One code unverified, under the floor of two: the carrier's drop earns its resend.
        assert_eq!(api_sends().await, GuardVerdict::Clear);
        send_held(&h, &first).await;
        wait_for_final_callback(&h, &first, SmsProvider::Infobip).await;
        assert_eq!(h.fake.messages(Some(&first)).len(), 2, "resent");
        // The resend counted nothing: one code still, so the api's next is clear as well.
        assert_eq!(api_sends().await, GuardVerdict::Clear);

        // Four unverified codes: the guard is tripped. A code the api sent before that is
        // dropped too, and gets no resend.
        api_sends().await;
        assert_eq!(api_sends().await, GuardVerdict::Tripped);
        // By difference: the in-process workers of the tests alongside share one recorder
        // (none of them trips a guard).
        let trips = async |worker: &RunningWorker, refused: &str| {
            let series = format!("country=\"US\",refused=\"{refused}\"}} ");
            h.metrics(worker)
                .await
                .lines()
                .filter(|line| line.starts_with("sms_resend_fraud_guard_trips_total{"))
                .find_map(|line| line.split_once(&series).map(|(_, n)| n.trim().to_owned()))
                .map_or(0, |n| n.parse::<u64>().expect("a count"))
        };
        let refused_before = trips(&worker, "true").await;
        send_held(&h, &second).await;
        wait_for_final_callback(&h, &second, SmsProvider::Twilio).await;
        let not_resent = lines_of(&h, &overrides, &second, What::NotResent).await;
        assert_eq!(not_resent.len(), 1, "{not_resent:?}");
        let detail = not_resent[0].detail.as_deref().unwrap_or_default();
        assert!(detail.contains("fraud guard"), "{detail}");
        assert_eq!(h.fake.messages(Some(&second)).len(), 1, "not resent");
        assert_eq!(trips(&worker, "true").await, refused_before + 1);
        worker.stop().await;

        // In `monitor`, a tripped country is resent all the same, and the trip counted.
        for (name, value) in &mut overrides {
            if name == "OTP_FRAUD_GUARD" {
                *value = "monitor".to_owned();
            }
        }
        let worker = h.start_worker(&pairs(&overrides)).await;
        let third = phone();
        h.fake.set_carrier(Carrier {
            delay_ms: 20,
            outcomes: vec![Outcome::new(&third, "undelivered", Some(30007))],
            ..Carrier::default()
        });
        let (refused_before, made_before) =
            (trips(&worker, "true").await, trips(&worker, "false").await);
        send_held(&h, &third).await;
        wait_for_final_callback(&h, &third, SmsProvider::Infobip).await;
        assert_eq!(h.fake.messages(Some(&third)).len(), 2, "resent in monitor");
        assert_eq!(trips(&worker, "false").await, made_before + 1);
        assert_eq!(trips(&worker, "true").await, refused_before);
    })
    .await;
}

#[tokio::test]
async fn no_resend_for_a_landline_an_expired_code_or_a_code_no_longer_held() {
    with_harness(QueueType::Classic, |h| async move {
        let overrides = h.receipts();
        let _worker = h.start_worker(&pairs(&overrides)).await;
        let (landline, expired, replaced) = (phone(), phone(), phone());
        h.fake.set_carrier(Carrier {
            delay_ms: 20,
            outcomes: vec![
                Outcome::new(&landline, "undelivered", Some(30006)),
                Outcome::new(&expired, "undelivered", Some(30007)),
                Outcome::new(&replaced, "undelivered", Some(30007)),
            ],
            ..Carrier::default()
        });
        send_held(&h, &landline).await;
        // Never held by the api: as if the user had already signed in or asked for a new code.
        h.publish(&event(&replaced, CODE_VALIDITY)).await;
        wait_for_final_callback(&h, &landline, SmsProvider::Twilio).await;
        wait_for_final_callback(&h, &replaced, SmsProvider::Twilio).await;

        // A code that expires before its receipt comes back.
        h.fake.set_carrier(Carrier {
            delay_ms: 1_000,
            outcomes: vec![Outcome::new(&expired, "undelivered", Some(30007))],
            ..Carrier::default()
        });
        let short = event(&expired, Duration::from_millis(2_500));
        h.hold_code(&short).await;
        h.publish(&short).await;
        wait_for_final_callback(&h, &expired, SmsProvider::Twilio).await;

        for (to, why) in [
            (&landline, "recipient"),
            (&replaced, "used or replaced"),
            (&expired, "expire"),
        ] {
            let not_resent = lines_of(&h, &overrides, to, What::NotResent).await;
            assert_eq!(not_resent.len(), 1, "{to}: {not_resent:?}");
            let detail = not_resent[0].detail.as_deref().unwrap_or_default();
            assert!(detail.contains(why), "{to}: {detail}");
            assert_eq!(h.fake.messages(Some(to)).len(), 1, "{to} got a resend");
        }

        // A report of the same status, now carrier-side, for the landline (a complicit carrier,
        // or a provider's second final report): the recipient-side failure stored first
        // refused the resend, and a repeat of the status does not earn one.
        let base = setting(&overrides, "CALLBACK_BASE_URL").to_owned();
        let url = format!("{base}/v1/callbacks/twilio");
        let sid = h.fake.messages(Some(&landline))[0].sid.clone();
        let params = dropped_callback(&h, &sid, &landline);
        assert_eq!(post_signed(&h, &url, &params, None).await, 204);
        assert_eq!(h.fake.requests(Some(&landline)).len(), 1, "no resend");
    })
    .await;
}

#[tokio::test]
async fn receipts_alone_open_the_breaker_while_the_api_accepts_everything() {
    with_harness(QueueType::Classic, |h| async move {
        let mut overrides = h.receipts();
        overrides.extend(
            [
                ("PROVIDER_DELIVERY_MIN_SAMPLES", "4"),
                ("PROVIDER_DELIVERY_FAILURE_RATIO", "0.5"),
                ("PROVIDER_BREAKER_COOLDOWN_SECS", "60"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned())),
        );
        let _worker = h.start_worker(&pairs(&overrides)).await;
        // Twilio's carrier drops every message to this range; its API answers 201 throughout.
        h.fake.set_carrier(Carrier {
            delay_ms: 10,
            outcomes: vec![
                Outcome::new("+1415", "undelivered", Some(30007)).via(SmsProvider::Twilio),
            ],
            ..Carrier::default()
        });
        let dropped: Vec<String> = (0..4).map(|_| phone()).collect();
        for to in &dropped {
            h.publish(&event(to, CODE_VALIDITY)).await;
        }
        for to in &dropped {
            wait_for_final_callback(&h, to, SmsProvider::Twilio).await;
        }
        assert!(
            h.fake
                .requests_via(SmsProvider::Twilio, None)
                .iter()
                .all(|r| r.status == 201),
            "Twilio's API accepted every send"
        );
        // Four dropped of four: the breaker is open, so new sends go to Infobip at once.
        let to = phone();
        h.publish(&event(&to, CODE_VALIDITY)).await;
        h.wait_for_messages(&to, 1).await;
        assert_eq!(h.fake.messages(Some(&to))[0].provider, SmsProvider::Infobip);
        let twilio_calls = h.fake.requests_via(SmsProvider::Twilio, Some(&to));
        assert!(twilio_calls.is_empty(), "{twilio_calls:?}");
    })
    .await;
}

#[tokio::test]
async fn a_failed_resend_whose_refusal_echoes_the_code_leaves_it_out_of_the_log() {
    with_harness(QueueType::Classic, |h| async move {
        let overrides = h.receipts();
        // A process of its own: its log is what an operator reads.
        let worker = h.start_worker_process(&pairs(&overrides)).await;
        let to = phone();
        h.fake.set_carrier(Carrier {
            delay_ms: 20,
            outcomes: vec![Outcome::new(&to, "undelivered", Some(30007))],
            ..Carrier::default()
        });
        let event = event(&to, CODE_VALIDITY);
        let code = event.otp.clone().expect("a code");
        // Infobip, the resend's provider, refuses it quoting the message it was given.
        h.fake.set_faults_for(
            SmsProvider::Infobip,
            Faults {
                rules: vec![Rule {
                    to: to.clone(),
                    response: InjectedResponse {
                        message: Some(format!(
                            "the text 'Your sign-in code is {code}' was refused"
                        )),
                        ..InjectedResponse::status(400)
                    },
                }],
                ..Faults::default()
            },
        );
        h.hold_code(&event).await;
        h.publish(&event).await;
        let failed = || {
            worker
                .logs()
                .lines()
                .find(|line| line.contains("the resend failed"))
                .map(str::to_owned)
        };
        eventually(
            WAIT,
            "the resend to fail, in the log and the timeline",
            || async {
                failed().is_some() && !lines_of(&h, &overrides, &to, What::Resent).await.is_empty()
            },
        )
        .await;
        let resent = lines_of(&h, &overrides, &to, What::Resent).await;
        assert_eq!(resent.len(), 1, "{resent:?}");
        assert_eq!(resent[0].provider.as_deref(), Some("infobip"));
        // The line, not the whole log: elsewhere six digits of a timestamp could match the code.
        let line = failed().expect("the line");
        assert!(
            line.contains("was refused"),
            "the refusal's text is kept: {line}"
        );
        assert!(!line.contains(&code), "the code reached the log: {line}");
        assert!(
            !h.trace(&to, &pairs(&overrides)).await.contains(&code),
            "the code reached the timeline"
        );
    })
    .await;
}
