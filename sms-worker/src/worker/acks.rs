//! Acknowledgements in batches.
//!
//! Every `basic.ack` is a frame the worker writes and RabbitMQ parses, and on a quorum queue a
//! command its Raft log replicates. One `basic.ack` with `multiple` settles every delivery up to
//! its tag at once, so under load the worker acknowledges in batches: each finished delivery is
//! noted here, and a flusher (woken by the first note, after [`LINGER`]) acknowledges the
//! longest run of finished deliveries at the front of the channel's unsettled ones with a single
//! frame.
//!
//! Sends finish out of order, and `multiple` must never cover a delivery still being worked on
//! (it would be settled before its SMS went out), nor one not yet read from its consumer (two
//! consumers share the channel's tags). So the run starts right after the highest tag below
//! which everything is settled, and stops at the first tag that is not finished; finished ones
//! beyond are acknowledged one by one in the same flush, never held back: a delivery stuck in a
//! long backoff must not keep the others from freeing their prefetch slots.
//!
//! Every delivery on the channel is [`Acks::delivered`] before its task starts, including the
//! broker's dead-letter copies consumed on the same channel; a task that settles its delivery
//! itself (nack, reject) says so with [`Acks::settled`] once the frame is out.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::Channel;
use lapin::options::BasicAckOptions;
use tokio::sync::Notify;
use tracing::warn;

use crate::metrics as m;

/// How long the flusher waits for more deliveries to finish before acknowledging: a few
/// milliseconds gather dozens of acks under load, and delay nothing a user waits for (the SMS
/// has gone out; a lost ack only means a redelivery that the ledger skips, unless Redis did
/// not take the `sent` record either: see `sent::keep_trying`).
const LINGER: Duration = Duration::from_millis(3);

/// A batch is sent without waiting out [`LINGER`] once this share of the prefetch (1/8) has
/// finished: a delivery waiting for its ack still holds a prefetch slot, and at saturation those
/// idle slots were what kept one worker from keeping up with the api (BENCHMARKS.md, issue 12).
const FULL_BATCH_DIVISOR: usize = 8;

#[derive(Default)]
struct Tags {
    /// Delivered on this channel and not yet settled with the broker.
    unsettled: BTreeSet<u64>,
    /// Of those, the ones whose handling is over and that wait for their ack.
    finished: BTreeSet<u64>,
    /// Every tag up to this one is settled. Tags count every delivery of the channel from 1, but
    /// two consumers share it (the work queue and the broker's dead-letter copies), so a tag can
    /// be settled before a lower one has even been read from the other consumer's stream: a
    /// `multiple` ack is safe only up to where every lower tag is known to be settled.
    settled_through: u64,
    /// Settled tags above `settled_through`.
    settled_ahead: BTreeSet<u64>,
}

impl Tags {
    fn mark_settled(&mut self, tag: u64) {
        if tag > self.settled_through {
            self.settled_ahead.insert(tag);
        }
        while self.settled_ahead.remove(&(self.settled_through + 1)) {
            self.settled_through += 1;
        }
    }

    /// What to send now: the tag of one `multiple` ack covering the run of finished deliveries
    /// right after `settled_through` (if any), and the other finished tags, to ack singly. The
    /// run is given as (its last tag, how many deliveries it covers).
    fn take_flush(&mut self) -> ((Option<u64>, u64), Vec<u64>) {
        let (mut front, mut covered) = (None, 0);
        loop {
            let next = self.settled_through + 1;
            if self.settled_ahead.remove(&next) {
                self.settled_through = next;
            } else if self.finished.remove(&next) {
                self.unsettled.remove(&next);
                self.settled_through = next;
                front = Some(next);
                covered += 1;
            } else {
                break;
            }
        }
        let singles: Vec<u64> = std::mem::take(&mut self.finished).into_iter().collect();
        for &tag in &singles {
            self.unsettled.remove(&tag);
            self.mark_settled(tag);
        }
        ((front, covered), singles)
    }
}

/// The batching acknowledger of one channel.
#[derive(Clone)]
pub(crate) struct Acks(Arc<Shared>);

struct Shared {
    channel: Channel,
    tags: Mutex<Tags>,
    /// The first finished delivery of a batch: start the linger.
    wake: Notify,
    /// The batch is full: stop lingering.
    full: Notify,
    /// How many finished deliveries make a full batch.
    full_batch: usize,
    /// Held by a flush from taking its tags until its frames are out, so that the flush at
    /// shutdown waits for one under way on the flusher: otherwise the channel could close
    /// between the flusher taking the tags and writing their ack, and those deliveries (their
    /// SMS sent) would go back to the queue.
    flushing: tokio::sync::Mutex<()>,
}

impl Acks {
    /// Starts the flusher of `channel`. It stops once every handle is dropped (the connection
    /// and the tasks of its deliveries are gone) or the channel has closed.
    pub(crate) fn start(channel: Channel, prefetch: u16) -> Self {
        let acks = Self(Arc::new(Shared {
            channel,
            tags: Mutex::default(),
            wake: Notify::new(),
            full: Notify::new(),
            full_batch: (usize::from(prefetch) / FULL_BATCH_DIVISOR).max(1),
            flushing: tokio::sync::Mutex::new(()),
        }));
        let flusher = Arc::downgrade(&acks.0);
        tokio::spawn(async move {
            loop {
                let Some(shared) = flusher.upgrade() else {
                    return;
                };
                if !shared.channel.status().connected() {
                    return;
                }
                // Looks again every second without a wake-up, to notice the end above.
                let woken = tokio::time::timeout(Duration::from_secs(1), shared.wake.notified());
                if woken.await.is_ok() {
                    // A `full` permit left from an earlier batch only ends this linger early.
                    let _ = tokio::time::timeout(LINGER, shared.full.notified()).await;
                    Acks(shared).flush().await;
                }
            }
        });
        acks
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, Tags> {
        self.0.tags.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A delivery arrived: no `multiple` ack may cover it until it is finished or settled.
    pub(crate) fn delivered(&self, tag: u64) {
        self.tags().unsettled.insert(tag);
    }

    /// The delivery's handling is over: acknowledge it with the next batch.
    pub(crate) fn finished(&self, tag: u64) {
        let waiting = {
            let mut tags = self.tags();
            tags.finished.insert(tag);
            tags.finished.len()
        };
        self.0.wake.notify_one();
        if waiting == self.0.full_batch {
            self.0.full.notify_one();
        }
    }

    /// The delivery was settled another way (nack, reject) and its frame is out.
    pub(crate) fn settled(&self, tag: u64) {
        let mut tags = self.tags();
        tags.unsettled.remove(&tag);
        tags.mark_settled(tag);
    }

    /// Whether the channel is still open: once it is not, the broker has put its unsettled
    /// deliveries back in their queues.
    pub(crate) fn channel_connected(&self) -> bool {
        self.0.channel.status().connected()
    }

    /// Whether the delivery is neither settled nor waiting for its ack: only then may its task
    /// settle it another way (a second settlement of one tag closes the channel).
    pub(crate) fn is_open(&self, tag: u64) -> bool {
        let tags = self.tags();
        tags.unsettled.contains(&tag) && !tags.finished.contains(&tag)
    }

    /// Acknowledges every finished delivery now (also at shutdown, before the channel closes).
    pub(crate) async fn flush(&self) {
        let _flushing = self.0.flushing.lock().await;
        let ((front, covered), singles) = self.tags().take_flush();
        if let Some(tag) = front {
            self.send(tag, covered, true).await;
        }
        for tag in singles {
            self.send(tag, 1, false).await;
        }
    }

    /// One frame acknowledging `deliveries` (more than one only with `multiple`).
    async fn send(&self, tag: u64, deliveries: u64, multiple: bool) {
        let multiple_label = if multiple { "true" } else { "false" };
        metrics::counter!(m::ACK_FRAMES, "multiple" => multiple_label).increment(1);
        metrics::counter!(m::ACKED).increment(deliveries);
        if let Err(e) = self
            .0
            .channel
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
        {
            // The channel is gone: the broker redelivers, and the ledger skips the copies.
            warn!(error = %e, "could not acknowledge; the broker will redeliver and the copies are skipped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(unsettled: &[u64], finished: &[u64]) -> Tags {
        Tags {
            unsettled: unsettled.iter().copied().collect(),
            finished: finished.iter().copied().collect(),
            ..Tags::default()
        }
    }

    #[test]
    fn one_multiple_ack_for_the_front_run() {
        let mut t = tags(&[1, 2, 3, 4], &[1, 2, 3]);
        assert_eq!(t.take_flush(), ((Some(3), 3), vec![]));
        assert_eq!(t.unsettled.iter().copied().collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn never_covers_a_delivery_still_being_worked_on() {
        // 2 is still sending: 1 goes with `multiple`, 3 and 5 singly, 2 and 4 stay unsettled.
        let mut t = tags(&[1, 2, 3, 4, 5], &[1, 3, 5]);
        assert_eq!(t.take_flush(), ((Some(1), 1), vec![3, 5]));
        assert_eq!(t.unsettled.iter().copied().collect::<Vec<_>>(), vec![2, 4]);
        assert!(t.finished.is_empty());
        // 2 finishes: its own `multiple` ack covers only 2 (3 is settled already).
        t.finished.insert(2);
        assert_eq!(t.take_flush(), ((Some(2), 1), vec![]));
    }

    #[test]
    fn never_covers_a_delivery_not_yet_read() {
        // Tag 2 (a dead-letter copy) is read and finished before tag 1 (an SMS, still in the
        // other consumer's stream): 2 is acknowledged alone.
        let mut t = tags(&[2], &[2]);
        assert_eq!(t.take_flush(), ((None, 0), vec![2]));
        t.unsettled.insert(1);
        assert!(t.unsettled.contains(&1));
        t.finished.insert(1);
        assert_eq!(t.take_flush(), ((Some(1), 1), vec![]));
        assert_eq!(t.settled_through, 2);
    }

    #[test]
    fn a_delivery_settled_otherwise_does_not_block_the_run() {
        let mut t = tags(&[1, 2, 3], &[1, 3]);
        t.unsettled.remove(&2); // nacked by its task
        t.mark_settled(2);
        assert_eq!(t.take_flush(), ((Some(3), 2), vec![]));
        assert_eq!(t.take_flush(), ((None, 0), vec![]));
    }
}
