//! The send-idempotency ledger: at most one SMS per event, through one record per `event_id` in
//! Redis.
//!
//! Key `{ns}:sms:{<event_id>}` (the braces make it a Redis Cluster hash tag). Values:
//! - `sending:<token>`: a worker holds the claim and is sending. The key carries a short lease
//!   (`SMS_CLAIM_LEASE_MS`) that the holder renews while it works, so a copy of the event
//!   delivered at the same time waits instead of sending a second SMS, and a copy redelivered
//!   after its worker died takes over once the lease has lapsed.
//! - `sent`: the provider accepted the SMS. Later copies are acknowledged without sending.
//! - `dead`: the event was dead-lettered. Later copies are acknowledged too, so an event ends as
//!   exactly one of "sent" or "dead-lettered". It never replaces `sent`, which a copy that took
//!   over a lapsed claim may have written while this one was being dead-lettered.
//! - `withdrawn`: written by the api, never by a worker, for an event whose publish it could not
//!   tell was stored (no confirm, and no refusal either), and only where no record exists (one
//!   script: a worker's claim and the api's withdrawal cannot both win). Copies are acknowledged
//!   without sending: the api answered 503 and gave the request's rate-limit slots back, so no
//!   SMS may go for it.
//!
//! A second key, `{ns}:sms:{<event_id>}:resend`, is the one resend a carrier-side delivery
//! failure may earn (see `worker::resend`): set once, however many receipts arrive.
//!
//! `sent` and `dead` live until the OTP expires plus [`DONE_MARGIN`]. No copy can reach a worker
//! later than that: the message's `expiration` makes the broker dead-letter it at `expires_at`.
//! Keeping records only that long bounds Redis to about (rate × (OTP lifetime + margin)) keys,
//! rather than two days of traffic.

use std::time::Duration;

use redis::RedisError;
use shared::redis_connection::RedisConnection;
use shared::redis_script::Script;
use shared::send_ledger::Record;
use uuid::Uuid;

pub use shared::send_ledger::DONE_MARGIN;

/// What a claim attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker now holds the claim.
    Acquired,
    /// Another worker (or another copy in this one) is sending right now.
    HeldElsewhere,
    /// Already sent or dead-lettered: nothing left to do.
    Finished(Finished),
}

/// How an event ended, once it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Sent,
    DeadLettered,
    /// The api withdrew it before any worker took it: never sent.
    Withdrawn,
}

/// Proves that this task holds an event's claim: only the holder may renew or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToken(String);

impl ClaimToken {
    /// A fresh token: `sending:<uuid>`.
    pub fn generate() -> Self {
        Self(format!(
            "{}{}",
            shared::send_ledger::SENDING_PREFIX,
            Uuid::new_v4().simple()
        ))
    }
}

#[derive(Clone)]
pub struct SendLedger {
    redis: RedisConnection,
    namespace: String,
    claim: Script,
    renew: Script,
    release: Script,
    finish_dead: Script,
}

impl SendLedger {
    pub fn new(redis: RedisConnection, namespace: &str) -> Self {
        Self {
            redis,
            namespace: namespace.to_owned(),
            // One round trip, atomic: take the claim if the key is free, else say who has it.
            claim: Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if not v then
                    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                    return 'acquired'
                  end
                  return v",
            ),
            // Only the holder may extend or drop its claim: after a lapse another worker owns it.
            renew: Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
                  end
                  return 0",
            ),
            release: Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                    return redis.call('DEL', KEYS[1])
                  end
                  return 0",
            ),
            // `dead` never replaces `sent`: a copy that sent the SMS after this one's claim was
            // lost has the last word, as a sign-in's late promotion trusts only `sent`.
            finish_dead: Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if v == ARGV[3] then
                    return v
                  end
                  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                  return v",
            ),
        }
    }

    pub fn key(&self, event_id: Uuid) -> String {
        shared::send_ledger::key(&self.namespace, event_id)
    }

    pub async fn claim(
        &self,
        event_id: Uuid,
        token: &ClaimToken,
        lease: Duration,
    ) -> Result<Claim, RedisError> {
        let value: String = self
            .claim
            .key(self.key(event_id))
            .arg(&token.0)
            .arg(millis(lease))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(match value.as_str() {
            "acquired" => Claim::Acquired,
            // Our own token: a previous attempt of this same task already holds it.
            v if v == token.0 => Claim::Acquired,
            v => match parse_finished(v) {
                Some(finished) => Claim::Finished(finished),
                None => Claim::HeldElsewhere,
            },
        })
    }

    /// Extends the lease; `false` when the claim was lost (it lapsed and someone took it).
    pub async fn renew(
        &self,
        event_id: Uuid,
        token: &ClaimToken,
        lease: Duration,
    ) -> Result<bool, RedisError> {
        let renewed: i64 = self
            .renew
            .key(self.key(event_id))
            .arg(&token.0)
            .arg(millis(lease))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(renewed == 1)
    }

    /// Gives the claim up so that a redelivered copy can try without waiting for the lease.
    pub async fn release(&self, event_id: Uuid, token: &ClaimToken) -> Result<(), RedisError> {
        let _deleted: i64 = self
            .release
            .key(self.key(event_id))
            .arg(&token.0)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// Records the outcome for `time_left` (until the OTP expires) plus [`DONE_MARGIN`]. Returns
    /// `true` when it replaced the api's withdrawal: the claim had been lost (released at
    /// shutdown, or its lease lapsed) and the api, hearing no confirm, withdrew the event, yet an
    /// SMS went. `dead` never replaces `sent`: a copy that took over a lost claim and sent has
    /// the last word.
    pub async fn finish(
        &self,
        event_id: Uuid,
        finished: Finished,
        time_left: Duration,
    ) -> Result<bool, RedisError> {
        let value = match finished {
            Finished::Sent => shared::send_ledger::SENT,
            Finished::DeadLettered => shared::send_ledger::DEAD,
            Finished::Withdrawn => shared::send_ledger::WITHDRAWN,
        };
        let keep_for = millis(time_left + DONE_MARGIN);
        let was: Option<String> = if finished == Finished::DeadLettered {
            self.finish_dead
                .key(self.key(event_id))
                .arg(value)
                .arg(keep_for)
                .arg(shared::send_ledger::SENT)
                .invoke_async(&mut self.redis.clone())
                .await?
        } else {
            // GET returns what the SET replaced (Redis 6.2), in the same command: cheaper for
            // Redis than a script, on the path every SMS takes.
            redis::cmd("SET")
                .arg(self.key(event_id))
                .arg(value)
                .arg("PX")
                .arg(keep_for)
                .arg("GET")
                .query_async(&mut self.redis.clone())
                .await?
        };
        Ok(was.as_deref() == Some(shared::send_ledger::WITHDRAWN))
    }
}

impl SendLedger {
    /// Claims the one resend an event may get; `false` when it was claimed before. Kept as long
    /// as the event's own record.
    pub async fn claim_resend(
        &self,
        event_id: &str,
        time_left: Duration,
    ) -> Result<bool, RedisError> {
        let claimed: Option<String> = redis::cmd("SET")
            .arg(format!("{}:sms:{{{event_id}}}:resend", self.namespace))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(millis(time_left + DONE_MARGIN))
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(claimed.is_some())
    }
}

fn parse_finished(value: &str) -> Option<Finished> {
    match Record::parse(value)? {
        Record::Sent => Some(Finished::Sent),
        Record::Dead => Some(Finished::DeadLettered),
        Record::Withdrawn => Some(Finished::Withdrawn),
        Record::Sending => None,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;
    use shared::redis_connection::RedisTarget;

    use super::*;

    /// The Redis the integration tests use (`TEST_REDIS_URL`), under a namespace of its own.
    fn ledger() -> SendLedger {
        let url = std::env::var("TEST_REDIS_URL")
            .unwrap_or_else(|_| shared::config::DEFAULT_REDIS_URL.to_owned());
        let target = RedisTarget::parse(&SecretString::from(url)).unwrap();
        let namespace = format!("ledger-test-{}", Uuid::new_v4().simple());
        SendLedger::new(RedisConnection::new(&target).unwrap(), &namespace)
    }

    #[tokio::test]
    async fn a_dead_letter_never_replaces_a_sent_record() {
        let ledger = ledger();
        let minute = Duration::from_secs(60);
        let (sent, lost) = (Uuid::new_v4(), Uuid::new_v4());
        let token = ClaimToken::generate();

        // This copy's claim lapsed and another copy sent the SMS; then this one dead-letters.
        assert_eq!(
            ledger.claim(sent, &token, minute).await.unwrap(),
            Claim::Acquired
        );
        assert!(!ledger.finish(sent, Finished::Sent, minute).await.unwrap());
        assert!(
            !ledger
                .finish(sent, Finished::DeadLettered, minute)
                .await
                .unwrap()
        );
        assert_eq!(
            ledger
                .claim(sent, &ClaimToken::generate(), minute)
                .await
                .unwrap(),
            Claim::Finished(Finished::Sent)
        );

        // Over a claim, its own or another's, the dead letter is recorded.
        assert_eq!(
            ledger.claim(lost, &token, minute).await.unwrap(),
            Claim::Acquired
        );
        assert!(
            !ledger
                .finish(lost, Finished::DeadLettered, minute)
                .await
                .unwrap()
        );
        assert_eq!(
            ledger
                .claim(lost, &ClaimToken::generate(), minute)
                .await
                .unwrap(),
            Claim::Finished(Finished::DeadLettered)
        );

        let mut redis = ledger.redis.clone();
        let _: i64 = redis::cmd("DEL")
            .arg(ledger.key(sent))
            .arg(ledger.key(lost))
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}
