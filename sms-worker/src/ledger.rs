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
//!   exactly one of "sent" or "dead-lettered". It is written only over the dead-lettering copy's
//!   own claim or where nothing is recorded: never over `sent`, which a copy that took over a
//!   lapsed claim may have written meanwhile, nor over that copy's claim while it sends.
//! - `withdrawn`: written by the api, never by a worker, for an event whose publish it could not
//!   tell was stored (no confirm, and no refusal either), and only where no record exists (one
//!   script: a worker's claim and the api's withdrawal cannot both win). Copies are acknowledged
//!   without sending: the api answered 503 and gave the request's rate-limit slots back, so no
//!   SMS may go for it.
//!
//! A second key, `{ns}:sms:{<event_id>}:resend`, is the one resend a carrier-side delivery
//! failure may earn (see `worker::resend`): set once, however many receipts arrive. A third,
//! `{ns}:sms:{<event_id>}:unanswered`, names a provider that ignores repeats and left a call of
//! the event unanswered (see [`SendLedger::note_unanswered`]).
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
    /// This worker now holds the claim. Taken over from a worker that left a call unanswered
    /// at a provider that ignores repeats (see [`SendLedger::note_unanswered`]): that provider.
    Acquired { unanswered_at: Option<String> },
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

/// What a renewal of a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still the holder's: the lease runs again from the renewal.
    Renewed,
    /// The event's outcome is recorded (by this holder, or another copy): no claim is left.
    Finished,
    /// Gone (lapsed, or released) or another copy's claim now.
    Lost,
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
    record_dead: Script,
    claim_resend: Script,
}

impl SendLedger {
    pub fn new(redis: RedisConnection, namespace: &str) -> Self {
        Self {
            redis,
            namespace: namespace.to_owned(),
            // One round trip, atomic: take the claim if the key is free, else say who has it.
            // A claim this task already holds (an earlier try whose answer was lost) gets a
            // fresh lease, so that the lease runs from this try, as its caller counts it.
            claim: Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if not v then
                    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                    local unanswered = redis.call('GET', KEYS[2])
                    if unanswered then return 'acquired:' .. unanswered end
                    return 'acquired'
                  end
                  if v == ARGV[1] then
                    redis.call('PEXPIRE', KEYS[1], ARGV[2])
                    local unanswered = redis.call('GET', KEYS[2])
                    if unanswered then return 'acquired:' .. unanswered end
                  end
                  return v",
            ),
            // Only the holder may extend or drop its claim: after a lapse another worker owns it.
            // Else says what is there instead ('' for nothing).
            renew: Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if v == ARGV[1] then
                    redis.call('PEXPIRE', KEYS[1], ARGV[2])
                    return 'renewed'
                  end
                  return v or ''",
            ),
            release: Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                    return redis.call('DEL', KEYS[1])
                  end
                  return 0",
            ),
            // `dead` goes only over this copy's own claim, or where nothing is recorded (the
            // claim lapsed): never over `sent`, which a copy that took the lapsed claim over may
            // have written, nor over that copy's claim while it sends.
            record_dead: Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if v and v ~= ARGV[1] then return v end
                  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
                  return false",
            ),
            // Taken once; asked again by the same claimant (an earlier try whose answer was
            // lost), still its own.
            claim_resend: Script::new(
                r"if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
                  if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
                  return 0",
            ),
        }
    }

    pub fn key(&self, event_id: Uuid) -> String {
        shared::send_ledger::key(&self.namespace, event_id)
    }

    /// `{ns}:sms:{<event_id>}:unanswered`: the provider that ignores repeats and left a call of
    /// the event unanswered (in the event's hash slot).
    fn unanswered_key(&self, event_id: Uuid) -> String {
        format!("{}:unanswered", self.key(event_id))
    }

    /// Notes that `provider`, which ignores repeats of a message id, left a call of the event
    /// unanswered, for `keep` (the OTP's life and the records' margin): a copy that takes the
    /// claim over after this worker died then repeats the call to it too, rather than hand the
    /// event to the next provider, which could send a second SMS.
    pub async fn note_unanswered(
        &self,
        event_id: Uuid,
        provider: &str,
        keep: Duration,
    ) -> Result<(), RedisError> {
        redis::cmd("SET")
            .arg(self.unanswered_key(event_id))
            .arg(provider)
            .arg("PX")
            .arg(millis(keep))
            .query_async(&mut self.redis.clone())
            .await
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
            .key(self.unanswered_key(event_id))
            .arg(&token.0)
            .arg(millis(lease))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(match value.as_str() {
            "acquired" => Claim::Acquired {
                unanswered_at: None,
            },
            v if v.starts_with("acquired:") => Claim::Acquired {
                unanswered_at: v.strip_prefix("acquired:").map(str::to_owned),
            },
            // Our own token: a previous attempt of this same task already holds it (with a note,
            // the script said so above: the answer that took the claim over may have been lost).
            v if v == token.0 => Claim::Acquired {
                unanswered_at: None,
            },
            v => match parse_finished(v) {
                Some(finished) => Claim::Finished(finished),
                None => Claim::HeldElsewhere,
            },
        })
    }

    /// Extends the lease, if the claim is still the holder's of `token`.
    pub async fn renew(
        &self,
        event_id: Uuid,
        token: &ClaimToken,
        lease: Duration,
    ) -> Result<Renewal, RedisError> {
        let found: String = self
            .renew
            .key(self.key(event_id))
            .arg(&token.0)
            .arg(millis(lease))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(match found.as_str() {
            "renewed" => Renewal::Renewed,
            found => match parse_finished(found) {
                Some(_) => Renewal::Finished,
                None => Renewal::Lost,
            },
        })
    }

    /// [`Self::release`] where Redis answers; where it does not, the claim lapses with its lease.
    pub async fn release_or_let_lapse(&self, event_id: Uuid, token: &ClaimToken) {
        if let Err(e) = self.release(event_id, token).await {
            tracing::debug!(error = %e, "could not release the claim; it will lapse");
        }
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

    /// Records the SMS as sent for `time_left` (until the OTP expires) plus [`DONE_MARGIN`],
    /// whatever was recorded. Returns `true` when it replaced the api's withdrawal: the claim
    /// had been lost (released at shutdown, or its lease lapsed) and the api, hearing no
    /// confirm, withdrew the event, yet an SMS went.
    pub async fn record_sent(
        &self,
        event_id: Uuid,
        time_left: Duration,
    ) -> Result<bool, RedisError> {
        // GET returns what the SET replaced (Redis 6.2), in the same command: cheaper for Redis
        // than a script, on the path every SMS takes.
        let was: Option<String> = redis::cmd("SET")
            .arg(self.key(event_id))
            .arg(shared::send_ledger::SENT)
            .arg("PX")
            .arg(millis(time_left + DONE_MARGIN))
            .arg("GET")
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(was.as_deref() == Some(shared::send_ledger::WITHDRAWN))
    }

    /// Records the event as dead-lettered by the holder of `token` (`None`: a copy that never
    /// held the claim, as when Redis was away), for as long as [`Self::record_sent`] would.
    /// `Some` says what stands instead: another copy's outcome or claim.
    pub async fn record_dead_letter(
        &self,
        event_id: Uuid,
        token: Option<&ClaimToken>,
        time_left: Duration,
    ) -> Result<Option<&'static str>, RedisError> {
        let stands: Option<String> = self
            .record_dead
            .key(self.key(event_id))
            // No record is ever empty: '' matches only where nothing is recorded.
            .arg(token.map_or("", |token| token.0.as_str()))
            .arg(shared::send_ledger::DEAD)
            .arg(millis(time_left + DONE_MARGIN))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(stands.map(|value| match Record::parse(&value) {
            Some(Record::Sending) => "another copy's claim",
            Some(Record::Sent) => "sent",
            Some(Record::Dead) => "dead",
            Some(Record::Withdrawn) => "withdrawn",
            None => "a value no program writes",
        }))
    }
}

impl SendLedger {
    /// Whether the event's one resend was claimed (and so made, or under way).
    pub async fn resend_claimed(&self, event_id: &str) -> Result<bool, RedisError> {
        redis::cmd("EXISTS")
            .arg(self.resend_key(event_id))
            .query_async(&mut self.redis.clone())
            .await
    }

    fn resend_key(&self, event_id: &str) -> String {
        format!("{}:sms:{{{event_id}}}:resend", self.namespace)
    }

    /// Claims the one resend an event may get for `claimant`; `false` when another claimed it
    /// before. Safe to ask again after an error: a claim whose answer was lost is still the
    /// claimant's. Kept as long as the event's own record.
    pub async fn claim_resend(
        &self,
        event_id: &str,
        claimant: &ClaimToken,
        time_left: Duration,
    ) -> Result<bool, RedisError> {
        let claimed: i64 = self
            .claim_resend
            .key(self.resend_key(event_id))
            .arg(&claimant.0)
            .arg(millis(time_left + DONE_MARGIN))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(claimed == 1)
    }
}

/// Runs a write of an event's outcome up to three times, 200 ms apart, and returns the last
/// answer: without the record, a copy of the event the broker still holds could be sent again,
/// and a Redis blip should not decide that. No further try once `no_time_left` says so after a
/// failed one (a stop's grace period is over, and what follows the write must be done within
/// seconds).
pub async fn with_a_few_tries<T, F, Fut>(
    no_time_left: impl Fn() -> bool,
    mut write: F,
) -> Result<T, RedisError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RedisError>>,
{
    let mut attempt = 1;
    loop {
        match write().await {
            Err(_) if attempt < 3 && !no_time_left() => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            answer => return answer,
        }
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
    use super::*;
    use crate::test_redis;

    /// The Redis the integration tests use (`TEST_REDIS_URL`), under a namespace of its own.
    fn ledger() -> SendLedger {
        SendLedger::new(test_redis::connection(), &test_redis::namespace("ledger"))
    }

    #[tokio::test]
    async fn a_dead_letter_is_recorded_only_over_its_own_claim_or_nothing() {
        let ledger = ledger();
        let minute = Duration::from_secs(60);
        let mine = ClaimToken::generate();
        let [own, unclaimed, sent, taken, withdrawn] = [(); 5].map(|()| Uuid::new_v4());
        let dead = |id, token| ledger.record_dead_letter(id, token, minute);
        // What another copy finds.
        let other = ClaimToken::generate();
        let looked_at = |id| ledger.claim(id, &other, minute);
        let dead_lettered = Claim::Finished(Finished::DeadLettered);

        assert_eq!(
            ledger.claim(own, &mine, minute).await.unwrap(),
            Claim::Acquired {
                unanswered_at: None
            }
        );
        assert_eq!(dead(own, Some(&mine)).await.unwrap(), None);
        assert_eq!(looked_at(own).await.unwrap(), dead_lettered);

        // Never claimed by this copy (Redis was away), and nobody else has it.
        assert_eq!(dead(unclaimed, None).await.unwrap(), None);
        assert_eq!(looked_at(unclaimed).await.unwrap(), dead_lettered);

        // Another copy took the lapsed claim over and sent the SMS: its outcome stands.
        assert!(!ledger.record_sent(sent, minute).await.unwrap());
        assert_eq!(dead(sent, Some(&mine)).await.unwrap(), Some("sent"));
        assert_eq!(
            looked_at(sent).await.unwrap(),
            Claim::Finished(Finished::Sent)
        );

        // Another copy holds the claim and is sending: its claim stands.
        let theirs = ClaimToken::generate();
        assert_eq!(
            ledger.claim(taken, &theirs, minute).await.unwrap(),
            Claim::Acquired {
                unanswered_at: None
            }
        );
        assert_eq!(
            dead(taken, Some(&mine)).await.unwrap(),
            Some("another copy's claim")
        );
        assert_eq!(looked_at(taken).await.unwrap(), Claim::HeldElsewhere);
        assert_eq!(
            ledger.renew(taken, &theirs, minute).await.unwrap(),
            Renewal::Renewed
        );
        assert_eq!(
            ledger.renew(taken, &mine, minute).await.unwrap(),
            Renewal::Lost
        );
        assert_eq!(
            ledger.renew(sent, &mine, minute).await.unwrap(),
            Renewal::Finished
        );

        // The api withdrew the event after this copy's claim lapsed: no SMS either way.
        let mut redis = ledger.redis.clone();
        let () = redis::cmd("SET")
            .arg(ledger.key(withdrawn))
            .arg(shared::send_ledger::WITHDRAWN)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(
            dead(withdrawn, Some(&mine)).await.unwrap(),
            Some("withdrawn")
        );
        assert_eq!(dead(withdrawn, None).await.unwrap(), Some("withdrawn"));

        // A resend is claimed once; the same claimant asking again (its answer lost) keeps it.
        let event = own.to_string();
        assert!(ledger.claim_resend(&event, &mine, minute).await.unwrap());
        assert!(ledger.claim_resend(&event, &mine, minute).await.unwrap());
        assert!(!ledger.claim_resend(&event, &other, minute).await.unwrap());
        assert!(ledger.resend_claimed(&event).await.unwrap());
        let _: i64 = redis::cmd("DEL")
            .arg(ledger.resend_key(&event))
            .query_async(&mut redis)
            .await
            .unwrap();

        for id in [own, unclaimed, sent, taken, withdrawn] {
            let _: i64 = redis::cmd("DEL")
                .arg(ledger.key(id))
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    }

    /// A claim taken over where a worker noted an unanswered call says at which provider, and so
    /// does its holder asking again; a claim of an event with no note says nothing.
    #[tokio::test]
    async fn a_claim_taken_over_says_where_a_call_went_unanswered() {
        let ledger = ledger();
        let minute = Duration::from_secs(60);
        let (event, quiet) = (Uuid::new_v4(), Uuid::new_v4());
        let (first, second) = (ClaimToken::generate(), ClaimToken::generate());
        let plain = Claim::Acquired {
            unanswered_at: None,
        };
        assert_eq!(ledger.claim(event, &first, minute).await.unwrap(), plain);
        ledger
            .note_unanswered(event, "infobip", minute)
            .await
            .unwrap();
        // Asked again by its holder, the note comes too: the answer that took the claim over may
        // have been the one lost.
        let noted = Claim::Acquired {
            unanswered_at: Some("infobip".to_owned()),
        };
        assert_eq!(ledger.claim(event, &first, minute).await.unwrap(), noted);
        // The first worker died: its claim lapsed.
        let mut redis = test_redis::connection();
        let _: i64 = redis::cmd("DEL")
            .arg(ledger.key(event))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(ledger.claim(event, &second, minute).await.unwrap(), noted);
        assert_eq!(ledger.claim(quiet, &second, minute).await.unwrap(), plain);
        for key in [
            ledger.key(event),
            ledger.unanswered_key(event),
            ledger.key(quiet),
        ] {
            let _: i64 = redis::cmd("DEL")
                .arg(key)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    }
}
