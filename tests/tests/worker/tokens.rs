//! One provider token for every worker: fetched once however many sends need it, renewed ahead
//! of expiry by exactly one process, and replaced once however many sends it fails.

use std::time::{Duration, Instant};

use shared::QueueType;
use tests::fake_sms::{SmsProvider, TokenPolicy};
use tests::wait::eventually;

use crate::harness::{Harness, WAIT, event, pairs, phone, with_harness};

/// Infobip alone, with OAuth: every send needs the shared token.
fn infobip_only(h: &Harness, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut overrides = h.failover();
    overrides.push(("SMS_PROVIDERS".to_owned(), "infobip".to_owned()));
    overrides.extend(
        extra
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned())),
    );
    overrides
}

/// Requests an SMS to a new number ten times a second while `go_on` says so, then waits until
/// each has been delivered.
async fn ten_a_second_until_delivered(h: &Harness, go_on: impl Fn() -> bool) {
    let mut numbers = Vec::new();
    while go_on() {
        let to = phone();
        h.request_sms(&to).await;
        numbers.push(to);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for to in &numbers {
        h.wait_for_messages(to, 1).await;
    }
}

#[tokio::test]
async fn a_hundred_concurrent_sends_on_an_empty_cache_make_one_token_call() {
    with_harness(QueueType::Classic, |h| async move {
        // A slow token endpoint, so the hundred sends really wait for it together.
        h.fake.set_token_policy(TokenPolicy {
            latency_ms: 300,
            ..TokenPolicy::default()
        });
        let numbers: Vec<String> = (0..100).map(|_| phone()).collect();
        for to in &numbers {
            h.request_sms(to).await;
        }
        let overrides = infobip_only(&h, &[("WORKER_CONCURRENCY", "100")]);
        let worker = h.start_worker(&pairs(&overrides)).await;
        eventually(WAIT, "100 SMS through Infobip", || async {
            h.fake.requests_via(SmsProvider::Infobip, None).len() >= 100
        })
        .await;
        worker.stop().await;
        assert_eq!(h.fake.messages(None).len(), 100);
        let calls = h.fake.token_calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].status, 200);
    })
    .await;
}

/// A code that runs out while its send waits for a token is not sent: the wait counts against
/// the attempt's time, which the code's life bounds. Before, the SMS went out once the token
/// came, 4 s later, with a code that no longer worked (and was billed).
#[tokio::test]
async fn a_code_that_runs_out_while_its_send_waits_for_a_token_is_not_sent() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_token_policy(TokenPolicy {
            latency_ms: 4_000,
            ..TokenPolicy::default()
        });
        let worker = h.start_worker(&pairs(&infobip_only(&h, &[]))).await;
        let to = phone();
        h.publish(&event(&to, Duration::from_secs(3))).await;
        let dead = h.wait_for_dead_letters(1).await;
        assert_eq!(
            dead[0].header_str("x-error-kind").as_deref(),
            Some("expired")
        );
        // The token came meanwhile; no SMS followed it.
        eventually(WAIT, "the token fetched", || async {
            !h.fake.token_calls().is_empty() && h.fake.token_calls_in_flight() == 0
        })
        .await;
        assert!(
            h.fake
                .requests_via(SmsProvider::Infobip, Some(&to))
                .is_empty()
        );
        worker.stop().await;
    })
    .await;
}

/// A send whose token came too late for its attempt goes to the next provider at once: nothing
/// went out, and a slow token endpoint must not hold every event on Infobip while Twilio works.
/// Before, the event backed off and went to Infobip again.
#[tokio::test]
async fn a_send_whose_token_came_too_late_goes_to_the_next_provider() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_token_policy(TokenPolicy {
            latency_ms: 3_000,
            ..TokenPolicy::default()
        });
        let mut overrides = h.failover();
        overrides.extend(
            [
                ("SMS_PROVIDERS", "infobip,twilio"),
                ("SEND_TIMEOUT_SECS", "2"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned())),
        );
        let worker = h.start_worker(&pairs(&overrides)).await;
        let to = phone();
        h.request_sms(&to).await;
        h.wait_for_messages(&to, 1).await;
        assert!(
            h.fake
                .requests_via(SmsProvider::Infobip, Some(&to))
                .is_empty()
        );
        assert_eq!(h.fake.requests_via(SmsProvider::Twilio, Some(&to)).len(), 1);
        worker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn fifty_sends_refused_with_a_stale_token_cause_one_refresh() {
    with_harness(QueueType::Classic, |h| async move {
        let overrides = infobip_only(&h, &[]);
        let worker = h.start_worker(&pairs(&overrides)).await;
        let first = phone();
        h.request_sms(&first).await;
        h.wait_for_messages(&first, 1).await;
        assert_eq!(h.fake.token_calls().len(), 1);

        // Infobip forgets the token the worker holds: every send with it gets 401.
        h.fake.expire_tokens();
        let numbers: Vec<String> = (0..50).map(|_| phone()).collect();
        for to in &numbers {
            h.request_sms(to).await;
        }
        for to in &numbers {
            h.wait_for_messages(to, 1).await;
        }
        worker.stop().await;
        assert_eq!(h.fake.token_calls().len(), 2, "{:?}", h.fake.token_calls());
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

#[tokio::test]
async fn four_worker_processes_share_one_token_renewed_once_per_lifetime() {
    with_harness(QueueType::Classic, |h| async move {
        // The hard way: short-lived tokens, a token endpoint that allows one call a second and
        // invalidates the previous token whenever it issues a new one.
        h.fake.set_token_policy(TokenPolicy {
            lifetime_secs: 5,
            calls_per_second: Some(1),
            invalidate_previous: true,
            ..TokenPolicy::default()
        });
        let overrides = infobip_only(&h, &[]);
        let mut workers = Vec::new();
        for _ in 0..4 {
            workers.push(h.start_worker_process(&pairs(&overrides)).await);
        }
        // 20 s of steady sends, ten a second.
        let started = Instant::now();
        ten_a_second_until_delivered(&h, || started.elapsed() < Duration::from_secs(20)).await;
        for worker in &mut workers {
            worker.terminate();
        }
        for worker in &mut workers {
            worker.wait(WAIT).await;
        }

        assert_eq!(
            h.dead_lettered().await,
            0,
            "no send failed for want of a token"
        );
        let calls = h.fake.token_calls();
        assert!(calls.iter().all(|c| c.status == 200), "{calls:?}");
        assert!(
            calls.iter().all(|c| c.concurrent == 1),
            "never two at once: {calls:?}"
        );
        // One call per lifetime: renewals about a second before expiry, never two in one.
        for pair in calls.windows(2) {
            let gap = Duration::try_from(pair[1].at - pair[0].at).unwrap();
            assert!(
                gap >= Duration::from_secs(3),
                "two calls {gap:?} apart: {calls:?}"
            );
        }
        assert!(
            (4..=7).contains(&calls.len()),
            "{} token calls in 20 s",
            calls.len()
        );
    })
    .await;
}

/// A token endpoint that answers tokens no header can carry: each is refused when fetched and
/// never stored, and while fetches fail the worker calls the endpoint about once a second, not
/// once per send. In a process of its own, so that its log is its own.
#[tokio::test]
async fn a_token_that_cannot_be_a_header_is_refused_when_fetched_and_never_stored() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_token_policy(TokenPolicy {
            unsendable: true,
            ..TokenPolicy::default()
        });
        // The breaker would stop the sends for 30 s after five failures; here they must go on.
        let overrides = infobip_only(
            &h,
            &[
                ("WORKER_CONCURRENCY", "20"),
                ("PROVIDER_BREAKER_FAILURES", "10000"),
            ],
        );
        let mut worker = h.start_worker_process(&pairs(&overrides)).await;
        let numbers: Vec<String> = (0..20).map(|_| phone()).collect();
        for to in &numbers {
            h.request_sms(to).await;
        }
        // Twenty sends retrying with backoff; each fetch refuses what it gets.
        eventually(WAIT, "three token fetches", || async {
            h.fake.token_calls().len() >= 3
        })
        .await;
        let stored: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:provider:*:token", h.ns))
            .query_async(&mut h.redis().await)
            .await
            .unwrap();
        assert!(
            stored.is_empty(),
            "an unusable token was stored: {stored:?}"
        );
        assert!(
            h.fake.messages(None).is_empty(),
            "nothing can have been sent"
        );
        let calls = h.fake.token_calls();
        for pair in calls.windows(2) {
            let gap = Duration::try_from(pair[1].at - pair[0].at).unwrap();
            assert!(
                gap >= Duration::from_millis(900),
                "two calls {gap:?} apart: {calls:?}"
            );
        }

        // Once the endpoint issues usable tokens, the same events go out.
        h.fake.set_token_policy(TokenPolicy::default());
        for to in &numbers {
            h.wait_for_messages(to, 1).await;
        }
        worker.terminate();
        worker.wait(WAIT).await;
        let logs = worker.logs();
        assert!(
            logs.contains("answered a token that cannot be sent as a header"),
            "{logs}"
        );
        // One token was fetched and stored: the usable one, at the end.
        assert_eq!(
            logs.matches("fetched a new provider token").count(),
            1,
            "{logs}"
        );
        assert!(!logs.contains("ibtok-"), "a token reached the log: {logs}");
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

/// Renewal is due but the endpoint answers only tokens no header can carry: until the current
/// token expires, sends go on with it, and the worker asks the endpoint about once a second, not
/// once per send.
#[tokio::test]
async fn a_failing_renewal_leaves_the_endpoint_alone_while_the_current_token_works() {
    with_harness(QueueType::Classic, |h| async move {
        // Five-second tokens: renewal is due a second before expiry.
        let short = TokenPolicy {
            lifetime_secs: 5,
            ..TokenPolicy::default()
        };
        h.fake.set_token_policy(short.clone());
        let overrides = infobip_only(&h, &[("PROVIDER_BREAKER_FAILURES", "10000")]);
        let worker = h.start_worker(&pairs(&overrides)).await;
        let first = phone();
        h.request_sms(&first).await;
        h.wait_for_messages(&first, 1).await;
        let issued = h.fake.token_calls()[0].at;
        h.fake.set_token_policy(TokenPolicy {
            unsendable: true,
            ..short
        });

        // Ten sends a second until just before the token expires: the last ones fall in the
        // renewal window.
        let until = issued + Duration::from_millis(4_800);
        ten_a_second_until_delivered(&h, || time::OffsetDateTime::now_utc() < until).await;
        worker.stop().await;
        let renewals: Vec<_> = h
            .fake
            .token_calls()
            .into_iter()
            .filter(|c| c.at > issued && c.at < until)
            .collect();
        assert!(
            !renewals.is_empty() && renewals.len() <= 2,
            "{} renewal calls in the window: {renewals:?}",
            renewals.len()
        );
        assert_eq!(h.dead_lettered().await, 0);
    })
    .await;
}

/// Infobip first, Twilio after it, and Infobip's token endpoint failing (here: issuing tokens no
/// header can carry). Sends waiting in the slow path get the outcome of the fetch they waited
/// for, together: their failures open Infobip's breaker and they go out through Twilio. They
/// do not each wait their turn for a fetch of their own, one a second, until five failures open
/// the breaker (five calls, and the last waiting sends delayed by seconds).
#[tokio::test]
async fn sends_waiting_for_a_failing_token_fetch_fail_over_together() {
    fail_over_together_when_tokens_are(TokenPolicy {
        unsendable: true,
        ..TokenPolicy::default()
    })
    .await;
}

/// An empty token is refused like an unsendable one, before it is stored and shared: sent, it
/// would only earn a 401 on every send.
#[tokio::test]
async fn an_empty_token_counts_as_a_failed_fetch() {
    fail_over_together_when_tokens_are(TokenPolicy {
        empty: true,
        ..TokenPolicy::default()
    })
    .await;
}

async fn fail_over_together_when_tokens_are(policy: TokenPolicy) {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_token_policy(TokenPolicy {
            // Slow enough that all twenty sends are waiting while the first fetch runs.
            latency_ms: 300,
            ..policy
        });
        let mut overrides = h.failover();
        overrides.extend([
            ("SMS_PROVIDERS".to_owned(), "infobip,twilio".to_owned()),
            ("WORKER_CONCURRENCY".to_owned(), "20".to_owned()),
        ]);
        let numbers: Vec<String> = (0..20).map(|_| phone()).collect();
        for to in &numbers {
            h.request_sms(to).await;
        }
        let worker = h.start_worker(&pairs(&overrides)).await;
        for to in &numbers {
            h.wait_for_messages(to, 1).await;
        }
        worker.stop().await;
        assert_eq!(
            h.fake.requests_via(SmsProvider::Twilio, None).len(),
            20,
            "every send failed over to Twilio"
        );
        assert!(
            h.fake.requests_via(SmsProvider::Infobip, None).is_empty(),
            "no send went out with the token"
        );
        let calls = h.fake.token_calls();
        assert!(
            calls.len() <= 2,
            "one fetch for the waiting sends: {calls:?}"
        );
        assert!(
            h.fake
                .messages(None)
                .iter()
                .all(|m| m.provider == SmsProvider::Twilio)
        );
    })
    .await;
}
