//! The whole stack on a Redis Cluster (`REDIS_URL=redis+cluster://…`): api and sms-worker as
//! programs, a throwaway three-master cluster, and a sign-in through them. Every script keeps
//! its keys in one hash slot, so nothing answers CROSSSLOT: the code, its limits (per phone,
//! per client network, per calling code, the fraud guard per country), the worker's ledger,
//! the number's timeline and Infobip's shared OAuth token all land on the cluster.
//!
//! Skipped with a message where `redis-server` is not installed, unless `CI` is set.

use std::time::Duration;

use serde_json::{Value, json};
use shared::redis_connection::{RedisConnection, RedisTarget};
use tests::loadgen;
use tests::redis_cluster::RedisCluster;
use tests::required;
use tests::stack::Stack;
use tests::wait::eventually;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn signs_in_with_redis_cluster() {
    let Some(cluster) = required::or_skip("the Redis Cluster test", RedisCluster::start).await
    else {
        return;
    };
    let url = cluster.url();
    // Infobip first: its OAuth token (sealed, shared by the workers, refreshed under a lock)
    // lives on the cluster too.
    let stack = Stack::start_on(
        &[
            ("REDIS_URL", url.as_str()),
            ("SMS_PROVIDERS", "infobip,twilio"),
        ],
        &[
            ("OTP_PER_COUNTRY_PER_HOUR", "1000"),
            ("OTP_GLOBAL_PER_MINUTE", "1000"),
        ],
        "info",
    )
    .await;
    let api = |path: &str| stack.client.post(format!("{}{path}", stack.api_url));

    // Two numbers, so the keys spread over more than one slot.
    for phone in ["+14155550140", "+447911123456"] {
        let sent = stack
            .json(api("/v1/otp").json(&json!({ "phone_number": phone })))
            .await;
        let challenge_id = sent["challenge_id"].clone();
        assert!(challenge_id.is_string(), "{sent}");
        let to = phone.replace('+', "%2B");
        let sms: Value = eventually(DEADLINE, "the SMS at fake-sms", || async {
            let url = format!("{}/messages?to={to}", stack.sms_url);
            let messages: Vec<Value> =
                stack.client.get(url).send().await.ok()?.json().await.ok()?;
            messages.into_iter().next()
        })
        .await;
        assert_eq!(
            sms["provider"],
            "infobip",
            "{sms}\n{}",
            stack.logs("sms-worker")
        );
        let code = loadgen::extract_code(sms["body"].as_str().unwrap()).expect("a code");

        let wrong = if code.starts_with('0') { "1" } else { "0" };
        let wrong = format!("{wrong}{}", &code[1..]);
        let guess = json!({ "phone_number": phone, "otp": wrong, "challenge_id": challenge_id });
        let refused = api("/v1/otp/verify").json(&guess).send().await.unwrap();
        assert_eq!(
            refused.status(),
            401,
            "a wrong guess is counted and refused"
        );

        let verify = json!({ "phone_number": phone, "otp": code, "challenge_id": challenge_id });
        let session = stack.json(api("/v1/otp/verify").json(&verify)).await;
        let token = session["access_token"].as_str().expect("an access token");
        let me = stack
            .json(
                stack
                    .client
                    .get(format!("{}/v1/me", stack.api_url))
                    .bearer_auth(token),
            )
            .await;
        assert_eq!(me["phone_number"], phone);
    }

    // Everything lives on the cluster, namespaced: limits, the ledger, the timelines.
    let keys = cluster.keys(&format!("{}:*", stack.namespace));
    for part in [
        ":limit:ip:",
        ":limit:cc:",
        ":limit:guard:",
        ":sms:",
        ":trace:",
        ":token",
    ] {
        assert!(
            keys.iter().any(|k| k.contains(part)),
            "no {part} key in {keys:?}"
        );
    }
}

/// A seed node that accepts connections and never answers (a hung host) must not keep callers
/// from reaching the cluster: each caller gives up after its own deadline, shorter than the
/// connect timeout the hung node costs, and the connection must still get made.
#[tokio::test]
async fn a_hung_seed_node_does_not_keep_callers_out() {
    let Some(cluster) = required::or_skip("the Redis Cluster test", RedisCluster::start).await
    else {
        return;
    };
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("a local port");
    let hung_port = hung.local_addr().expect("its address").port();
    std::thread::spawn(move || {
        // Accepts and holds every connection, answering nothing.
        let held: Vec<_> = hung.incoming().collect();
        drop(held);
    });
    let url = cluster.url().replace(
        "redis+cluster://",
        &format!("redis+cluster://127.0.0.1:{hung_port},"),
    );
    let target = RedisTarget::parse(&url.into()).expect("a cluster URL");
    let connection = RedisConnection::new(&target).expect("a client");

    let started = std::time::Instant::now();
    let mut attempts = 0;
    let answered = loop {
        attempts += 1;
        let mut caller = connection.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut caller);
        match tokio::time::timeout(Duration::from_millis(1500), ping).await {
            Ok(Ok(pong)) => break pong,
            Ok(Err(e)) => eprintln!("attempt {attempts}: {e}"),
            Err(_) => eprintln!("attempt {attempts}: gave up after 1.5 s"),
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no caller reached the cluster in {DEADLINE:?} ({attempts} attempts)"
        );
    };
    assert_eq!(answered, "PONG");
}

/// A cluster node that accepts connections and never answers fails each command after the
/// connection's overall response deadline (2 s, retries included), so a hung node holds neither
/// the api's requests nor the worker's ledger record and prefetch slot for longer than that.
#[tokio::test]
async fn a_hung_cluster_node_fails_each_command_within_seconds() {
    use redis::AsyncCommands as _;

    let Some((cluster, mut redis)) = cluster_and_connection().await else {
        return;
    };
    let _: () = redis.set("hung-node-test", "1").await.expect("SET");

    cluster.freeze();
    // The first command meets the open connection; the next ones must reconnect.
    for attempt in 1..=3 {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            redis.get::<_, Option<String>>("hung-node-test"),
        )
        .await
        .expect("the command ends");
        let took = started.elapsed();
        assert!(answer.is_err(), "attempt {attempt}: {answer:?}");
        assert!(
            took < Duration::from_secs(5),
            "attempt {attempt} took {took:?}"
        );
    }
}

/// A node without the script in its cache (a promoted replica, a restarted master) must run it
/// while another node of the cluster is down. The redis crate's own scripts answer `NOSCRIPT` with
/// `SCRIPT LOAD` sent to every node, which fails while any node does not answer; ours fall back
/// to `EVAL` on the key's node.
#[tokio::test]
async fn a_script_runs_on_a_node_that_lost_it_while_another_node_is_down() {
    use shared::redis_script::Script;

    let Some((cluster, mut redis)) = cluster_and_connection().await else {
        return;
    };
    let script = Script::new("return redis.call('INCR', KEYS[1])");
    let key = "{script-test}:count";
    let first: i64 = script
        .key(key)
        .invoke_async(&mut redis)
        .await
        .expect("the first run");
    assert_eq!(first, 1);

    let serving = cluster.port_serving(key);
    cluster.flush_scripts(serving);
    let down = *cluster
        .ports()
        .iter()
        .find(|port| **port != serving)
        .expect("a second node");
    cluster.freeze_node(down);

    let second = tokio::time::timeout(
        Duration::from_secs(10),
        script.key(key).invoke_async::<i64>(&mut redis),
    )
    .await
    .expect("the script call ends");
    assert_eq!(second.expect("the script runs on its key's node"), 2);
    // EVAL cached it there: the next call is an EVALSHA that works.
    let third: i64 = script
        .key(key)
        .invoke_async(&mut redis)
        .await
        .expect("the third run");
    assert_eq!(third, 3);
}

/// A throwaway cluster and the programs' connection type to it; `None` (the test skips) where
/// `redis-server` is not installed.
async fn cluster_and_connection() -> Option<(RedisCluster, RedisConnection)> {
    let cluster = required::or_skip("the Redis Cluster test", RedisCluster::start).await?;
    let target = RedisTarget::parse(&cluster.url().into()).expect("a cluster URL");
    let redis = RedisConnection::new(&target).expect("a cluster connection");
    Some((cluster, redis))
}
