//! Settling a publish whose outcome is unknown: the event was sent, and neither a confirm nor a
//! refusal came back. The broker may have stored it, so a worker may send it. The api settles
//! the question in the worker's send ledger (`shared::send_ledger`): it records the event as
//! withdrawn unless a worker already took it, in one script on one key, so exactly one of the
//! two wins. Withdrawn, no worker will ever send it; taken, it was stored.

use std::sync::LazyLock;
use std::time::Duration;

use shared::OtpRequested;
use shared::redis_script::Script;
use shared::send_ledger::{self, Record};
use time::OffsetDateTime;

use crate::state::AppState;

/// Short, so that this step fits in the request's 10 s with the others (see the module doc of
/// `signin`).
const WITHDRAW_DEADLINE: Duration = Duration::from_secs(1);

/// Writes `withdrawn` unless the key holds anything, and returns what it held. A script rather
/// than `SET NX GET`, which needs Redis 7.
static WITHDRAW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local held = redis.call('GET', KEYS[1])
          if held then return held end
          redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
          return false",
    )
});

/// How an unknown publish was settled.
pub enum Settled {
    /// No worker had taken it, and none will: no SMS.
    Withdrawn,
    /// A worker is sending it or has sent it: the broker stored it.
    Taken,
    /// A worker took it and dead-lettered it: no SMS.
    DeadLettered,
    /// Redis could not say, or said something neither program writes: an SMS may go.
    Unsettled,
}

impl Settled {
    /// The `resolution` label of `amqp_publish_outcome_unknown_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Taken => "taken",
            Self::Withdrawn => "withdrawn",
            Self::DeadLettered => "dead_lettered",
            Self::Unsettled => "kept",
        }
    }
}

/// Withdraws `event` unless a worker already took it.
pub async fn withdraw(state: &AppState, event: &OtpRequested) -> Settled {
    // As long as the worker keeps its own records: no copy of the event can arrive later.
    let remember = Duration::from_millis(event.millis_left(OffsetDateTime::now_utc()))
        + send_ledger::DONE_MARGIN;
    let mut redis = state.redis();
    let mut invocation = WITHDRAW.key(send_ledger::key(
        &state.config.common.namespace,
        event.event_id,
    ));
    invocation.arg(send_ledger::WITHDRAWN).arg(
        u64::try_from(remember.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
    );
    let held = tokio::time::timeout(
        WITHDRAW_DEADLINE,
        invocation.invoke_async::<Option<String>>(&mut redis),
    )
    .await;
    match held {
        Ok(Ok(None)) => Settled::Withdrawn,
        Ok(Ok(Some(held))) => match Record::parse(&held) {
            Some(Record::Sending | Record::Sent) => Settled::Taken,
            Some(Record::Dead) => Settled::DeadLettered,
            // Its own write, seen again: a Redis Cluster client resends a command whose
            // connection dropped before the reply.
            Some(Record::Withdrawn) => Settled::Withdrawn,
            None => {
                tracing::warn!(event_id = %event.event_id, "the send ledger holds a value neither program writes");
                Settled::Unsettled
            }
        },
        Ok(Err(e)) => {
            tracing::warn!(event_id = %event.event_id, error = %e, "Redis could not withdraw the event");
            Settled::Unsettled
        }
        Err(_) => {
            tracing::warn!(event_id = %event.event_id, "Redis did not answer the withdrawal within {WITHDRAW_DEADLINE:?}");
            Settled::Unsettled
        }
    }
}
