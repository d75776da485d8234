//! The AMQP objects of docs/messaging.md#topology, declared idempotently by both programs at start-up, so either one
//! can start first.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::QueueType;

/// Redeliveries of one message before the broker dead-letters it itself. The worker handles
/// retries while it holds a message, so a message only comes back when a worker died holding it;
/// a message that kills workers repeatedly must not loop forever.
pub const SMS_DELIVERY_LIMIT: i64 = 10;
/// The dead-letter queue keeps at most this many entries (the oldest are dropped first) ...
pub const DLQ_MAX_LENGTH: i64 = 100_000;
/// ... for at most this long: a failed OTP has long expired by then and is only of forensic use.
pub const DLQ_MAX_AGE_MS: i64 = 7 * 24 * 3600 * 1000;
/// A quorum queue counts every requeue toward its delivery limit (RabbitMQ 4 sets 20 by default)
/// and drops an entry past it, so a DLQ that operators inspect often would lose entries. `-1`
/// means "no limit" on RabbitMQ 4 but drops a message on its first requeue on 3.x (checked on
/// 3.10), so the DLQ gets the largest limit instead: two billion looks per entry.
pub const DLQ_DELIVERY_LIMIT: i64 = i32::MAX as i64;

#[derive(Debug, Clone)]
pub struct Topology {
    pub namespace: String,
    pub queue_type: QueueType,
    /// Quorum queues: how many nodes get a replica when a queue is created
    /// (`x-quorum-initial-group-size`); `None` leaves it to the broker.
    pub quorum_group_size: Option<u32>,
}

impl Topology {
    pub fn new(namespace: &str, queue_type: QueueType) -> Self {
        Self {
            namespace: namespace.to_owned(),
            queue_type,
            quorum_group_size: None,
        }
    }

    /// A replica of each new quorum queue on each of the `nodes` that `AMQP_URL` lists: with
    /// three, any one node can die and the queue keeps its majority. RabbitMQ 3.x puts one on
    /// every node by default, 4.x on three; saying it makes it so on either.
    ///
    /// RabbitMQ compares this argument on every declaration and refuses a queue declared
    /// without it, or with another count, as inequivalent. So a queue that exists already is
    /// left as it is (see [`Topology::declare`]): adding a node to `AMQP_URL` never stops a
    /// program from starting. One node listed (or a load balancer's one address) sets nothing.
    pub fn with_quorum_group_size(mut self, nodes: usize) -> Self {
        self.quorum_group_size = (nodes > 1).then(|| u32::try_from(nodes).unwrap_or(u32::MAX));
        self
    }

    /// Declares a queue with `arguments`, unless a replica count is set and the queue exists
    /// already (see [`Topology::with_quorum_group_size`]).
    async fn declare_queue(
        &self,
        connection: &Connection,
        channel: &Channel,
        name: String,
        arguments: FieldTable,
    ) -> lapin::Result<()> {
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        if self.queue_type == QueueType::Quorum && self.quorum_group_size.is_some() {
            // A passive declaration of a missing queue closes its channel: a channel of its own.
            let probe = connection.create_channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let exists = probe
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
                .is_ok();
            if probe.status().connected() {
                let _ = probe.close(200, "checked".into()).await;
            }
            if exists {
                return Ok(());
            }
        }
        channel
            .queue_declare(name.into(), durable_queue, arguments)
            .await
            .map(drop)
    }

    /// Topic exchange the api publishes `OtpRequested` to.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// The work queue the sms-workers consume.
    pub fn sms_queue(&self) -> String {
        format!("{}.sms", self.namespace)
    }

    /// Fanout exchange where RabbitMQ dead-letters what it drops from `{ns}.sms` (an OTP that
    /// expired in the queue, a message over the delivery limit).
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.namespace)
    }

    /// Where operators inspect failed sends. Only the workers publish here (through the default
    /// exchange), and always without the code.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.sms.dlq", self.namespace)
    }

    /// What RabbitMQ dead-lettered itself, as it came, code included: the workers drain it into
    /// the dead-letter queue with the code removed, so no readable code is kept for days.
    pub fn broker_dead_letter_queue(&self) -> String {
        format!("{}.sms.dead", self.namespace)
    }

    /// Every queue of the namespace.
    pub fn queues(&self) -> [String; 3] {
        [
            self.sms_queue(),
            self.dead_letter_queue(),
            self.broker_dead_letter_queue(),
        ]
    }

    /// Every exchange of the namespace.
    pub fn exchanges(&self) -> [String; 2] {
        [self.events_exchange(), self.dead_letter_exchange()]
    }

    /// Declares exchanges, queues and bindings. Idempotent: the same arguments every time, so a
    /// redeclaration by another process or version never fails with PRECONDITION_FAILED.
    pub async fn declare(&self, connection: &Connection, channel: &Channel) -> lapin::Result<()> {
        // Durable everywhere: a broker restart must not lose accepted OTP requests.
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Fanout,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;

        self.declare_queue(
            connection,
            channel,
            self.sms_queue(),
            self.sms_queue_arguments(),
        )
        .await?;
        channel
            .queue_bind(
                self.sms_queue().into(),
                self.events_exchange().into(),
                crate::event::ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        self.declare_queue(
            connection,
            channel,
            self.dead_letter_queue(),
            self.dead_letter_queue_arguments(),
        )
        .await?;
        self.declare_queue(
            connection,
            channel,
            self.broker_dead_letter_queue(),
            self.dead_letter_queue_arguments(),
        )
        .await?;
        channel
            .queue_bind(
                self.broker_dead_letter_queue().into(),
                self.dead_letter_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Versions before the holding queue bound the DLQ to the exchange, which kept the
        // broker's copies (codes included) there; unbinding is a no-op once it is gone.
        channel
            .queue_unbind(
                self.dead_letter_queue().into(),
                self.dead_letter_exchange().into(),
                "".into(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    fn sms_queue_arguments(&self) -> FieldTable {
        let mut args = self.queue_type_arguments();
        // Expired messages (per-message TTL = time left on the OTP) and messages over the delivery
        // limit go to the dead-letter exchange, with the reason in `x-death`.
        insert(
            &mut args,
            "x-dead-letter-exchange",
            string(self.dead_letter_exchange()),
        );
        if self.queue_type == QueueType::Quorum {
            insert(
                &mut args,
                "x-delivery-limit",
                AMQPValue::LongLongInt(SMS_DELIVERY_LIMIT),
            );
            // At-least-once dead-lettering needs reject-publish overflow; at-most-once (the
            // default) is kept because the worker publishes its own dead letters with confirms,
            // and the broker only dead-letters expired or poison messages here.
        }
        args
    }

    fn dead_letter_queue_arguments(&self) -> FieldTable {
        let mut args = self.queue_type_arguments();
        // Bounded retention: a flood of failures must not fill the broker's disk.
        insert(
            &mut args,
            "x-max-length",
            AMQPValue::LongLongInt(DLQ_MAX_LENGTH),
        );
        insert(
            &mut args,
            "x-message-ttl",
            AMQPValue::LongLongInt(DLQ_MAX_AGE_MS),
        );
        // No x-dead-letter-exchange: nothing leaves the DLQ but by age, length or purge.
        if self.queue_type == QueueType::Quorum {
            insert(
                &mut args,
                "x-delivery-limit",
                AMQPValue::LongLongInt(DLQ_DELIVERY_LIMIT),
            );
        }
        args
    }

    fn queue_type_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let kind = match self.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        insert(&mut args, "x-queue-type", string(kind.to_owned()));
        if let (QueueType::Quorum, Some(size)) = (self.queue_type, self.quorum_group_size) {
            insert(
                &mut args,
                "x-quorum-initial-group-size",
                AMQPValue::LongLongInt(i64::from(size)),
            );
        }
        args
    }
}

fn insert(args: &mut FieldTable, key: &str, value: AMQPValue) {
    args.insert(ShortString::from(key), value);
}

fn string(value: String) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_per_listed_node_for_new_quorum_queues() {
        let group = |topology: &Topology| {
            topology
                .sms_queue_arguments()
                .inner()
                .get("x-quorum-initial-group-size")
                .cloned()
        };
        let three = Topology::new("ns", QueueType::Quorum).with_quorum_group_size(3);
        assert_eq!(group(&three), Some(AMQPValue::LongLongInt(3)));
        let one = Topology::new("ns", QueueType::Quorum).with_quorum_group_size(1);
        assert_eq!(group(&one), None);
        let classic = Topology::new("ns", QueueType::Classic).with_quorum_group_size(3);
        assert_eq!(group(&classic), None);
    }
}
