//! What fake-sms remembers: the accepted messages (indexed by number), every request with its
//! answer, and the faults to inject. Shared by the HTTP handlers and an in-process handle.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::FakeSmsConfig;
use super::faults::{Faults, InjectedResponse};

/// Older records are forgotten past this, so a long benchmark does not grow without bound.
pub(super) const MAX_RECORDS: usize = 100_000;

/// Which provider's endpoint a message or request came through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmsProvider {
    #[default]
    Twilio,
    Infobip,
}

impl SmsProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Twilio => "twilio",
            Self::Infobip => "infobip",
        }
    }
}

/// An accepted message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedMessage {
    /// Which provider carried it.
    #[serde(default)]
    pub provider: SmsProvider,
    pub sid: String,
    pub to: String,
    pub from: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub body: String,
    pub validity_period: Option<u32>,
    /// Where the sender asked for its delivery reports (Twilio's `StatusCallback`, Infobip's
    /// `webhooks.delivery.url`).
    #[serde(default)]
    pub callback_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
}

/// Any request to a send endpoint, and how it was answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedRequest {
    #[serde(default)]
    pub provider: SmsProvider,
    pub id: u64,
    pub to: Option<String>,
    pub status: u16,
    pub code: Option<i64>,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// When the answer left; `None` while it is delayed, or if the client hung up first.
    #[serde(with = "time::serde::rfc3339::option")]
    pub responded_at: Option<OffsetDateTime>,
}

#[derive(Default)]
struct Records {
    messages: VecDeque<RecordedMessage>,
    /// Sequence number of `messages[0]`.
    first_message: u64,
    /// Sequence numbers of each number's messages, oldest first: `?to=` look-ups stay cheap
    /// with a full inbox (loadgen polls one per sign-in).
    by_to: HashMap<String, VecDeque<u64>>,
    requests: VecDeque<RecordedRequest>,
    faults: HashMap<SmsProvider, Faults>,
    last_request_id: u64,
}

impl Records {
    fn record(&mut self, message: RecordedMessage) {
        let seq = self.first_message + self.messages.len() as u64;
        self.by_to
            .entry(message.to.clone())
            .or_default()
            .push_back(seq);
        self.messages.push_back(message);
        if self.messages.len() > MAX_RECORDS
            && let Some(oldest) = self.messages.pop_front()
        {
            self.first_message += 1;
            if let Some(seqs) = self.by_to.get_mut(&oldest.to) {
                seqs.pop_front();
                if seqs.is_empty() {
                    self.by_to.remove(&oldest.to);
                }
            }
        }
    }

    fn messages_to(&self, to: &str) -> Vec<RecordedMessage> {
        let Some(seqs) = self.by_to.get(to) else {
            return Vec::new();
        };
        seqs.iter()
            .filter_map(|seq| self.messages.get((seq - self.first_message) as usize))
            .cloned()
            .collect()
    }
}

/// The fake's state, shared by the HTTP handlers and an in-process [`super::FakeSms`] handle.
pub struct FakeState {
    pub(super) config: FakeSmsConfig,
    records: Mutex<Records>,
    tokens: Mutex<super::infobip::Tokens>,
    carrier: Mutex<super::carrier::Carrier>,
    callbacks: Mutex<Vec<super::carrier::SentCallback>>,
}

impl FakeState {
    pub fn new(config: FakeSmsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            records: Mutex::new(Records::default()),
            tokens: Mutex::new(super::infobip::Tokens::default()),
            carrier: Mutex::new(super::carrier::Carrier::default()),
            callbacks: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn tokens(&self) -> MutexGuard<'_, super::infobip::Tokens> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn carrier(&self) -> MutexGuard<'_, super::carrier::Carrier> {
        self.carrier.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn callbacks(&self) -> MutexGuard<'_, Vec<super::carrier::SentCallback>> {
        let mut callbacks = self.callbacks.lock().unwrap_or_else(|e| e.into_inner());
        if callbacks.len() >= MAX_RECORDS {
            callbacks.drain(..MAX_RECORDS / 2);
        }
        callbacks
    }

    pub fn messages(&self, to: Option<&str>) -> Vec<RecordedMessage> {
        let records = self.lock();
        match to {
            Some(to) => records.messages_to(to),
            None => records.messages.iter().cloned().collect(),
        }
    }

    /// How many messages were received since start, the forgotten and cleared ones included:
    /// cheap to poll, unlike the list itself, and it keeps counting past [`MAX_RECORDS`].
    pub fn message_count(&self) -> u64 {
        let records = self.lock();
        records.first_message + records.messages.len() as u64
    }

    /// Requests to every provider's send endpoint.
    pub fn requests(&self, to: Option<&str>) -> Vec<RecordedRequest> {
        self.lock()
            .requests
            .iter()
            .filter(|r| to.is_none_or(|to| r.to.as_deref() == Some(to)))
            .cloned()
            .collect()
    }

    /// How each request to `to` (or to anyone) was answered, in order.
    pub fn statuses(&self, to: Option<&str>) -> Vec<u16> {
        self.requests(to).iter().map(|r| r.status).collect()
    }

    /// Requests to one provider's send endpoint.
    pub fn requests_via(&self, provider: SmsProvider, to: Option<&str>) -> Vec<RecordedRequest> {
        self.requests(to)
            .into_iter()
            .filter(|r| r.provider == provider)
            .collect()
    }

    /// Twilio's faults (the provider fake-sms started with).
    pub fn set_faults(&self, faults: Faults) {
        self.set_faults_for(SmsProvider::Twilio, faults);
    }

    pub fn faults(&self) -> Faults {
        self.faults_for(SmsProvider::Twilio)
    }

    pub fn set_faults_for(&self, provider: SmsProvider, faults: Faults) {
        self.lock().faults.insert(provider, faults);
    }

    pub fn faults_for(&self, provider: SmsProvider) -> Faults {
        self.lock()
            .faults
            .get(&provider)
            .cloned()
            .unwrap_or_default()
    }

    pub fn clear(&self) {
        let mut records = self.lock();
        records.first_message += records.messages.len() as u64;
        records.messages.clear();
        records.by_to.clear();
        records.requests.clear();
    }

    /// The padding after each answer: its bytes, and whether they trickle.
    pub(super) fn answer_padding(&self, provider: SmsProvider) -> (u64, bool) {
        self.lock().faults.get(&provider).map_or((0, false), |f| {
            (f.answer_padding_bytes, f.answer_padding_trickles)
        })
    }

    pub(super) fn latency_ms(&self, provider: SmsProvider) -> u64 {
        self.lock()
            .faults
            .get(&provider)
            .map_or(0, |f| f.latency_ms)
    }

    /// The injected answer for a request to `to`, if any (a queued one is used up).
    pub(super) fn take_injected(
        &self,
        provider: SmsProvider,
        to: &str,
    ) -> Option<InjectedResponse> {
        self.lock().faults.entry(provider).or_default().take_for(to)
    }

    pub(super) fn record_message(&self, message: RecordedMessage) {
        self.lock().record(message);
    }

    /// Records a request as answered with `status` (not yet sent); returns its id.
    pub(super) fn record_request(
        &self,
        provider: SmsProvider,
        to: Option<String>,
        status: u16,
        code: Option<i64>,
        received_at: OffsetDateTime,
    ) -> u64 {
        let mut records = self.lock();
        records.last_request_id += 1;
        let id = records.last_request_id;
        records.requests.push_back(RecordedRequest {
            provider,
            id,
            to,
            status,
            code,
            received_at,
            responded_at: None,
        });
        if records.requests.len() > MAX_RECORDS {
            records.requests.pop_front();
        }
        id
    }

    pub(super) fn mark_responded(&self, id: u64) {
        if let Some(request) = self.lock().requests.iter_mut().rev().find(|r| r.id == id) {
            request.responded_at = Some(OffsetDateTime::now_utc());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbox_index_follows_eviction() {
        let mut records = Records::default();
        let message = |to: &str, n: usize| RecordedMessage {
            provider: SmsProvider::Twilio,
            sid: format!("SM{n}"),
            to: to.to_owned(),
            from: None,
            messaging_service_sid: None,
            body: format!("message {n}"),
            validity_period: None,
            callback_url: None,
            received_at: OffsetDateTime::UNIX_EPOCH,
        };
        records.record(message("+1", 0));
        for n in 1..MAX_RECORDS + 2 {
            records.record(message("+2", n));
        }
        records.record(message("+1", MAX_RECORDS + 2));
        // Three over the limit: "+1"'s first message and "+2"'s first two were evicted.
        let ones = records.messages_to("+1");
        assert_eq!(ones.len(), 1);
        assert_eq!(ones[0].sid, format!("SM{}", MAX_RECORDS + 2));
        let twos = records.messages_to("+2");
        assert_eq!(twos.len(), MAX_RECORDS - 1);
        assert_eq!(twos[0].sid, "SM3");
        assert!(records.messages_to("+3").is_empty());
    }
}
