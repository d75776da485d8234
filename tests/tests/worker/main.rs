//! sms-worker against the real RabbitMQ and Redis (found as tests::servers says), with fake-sms
//! (real HTTP) as Twilio.
//!
//! Each test has its own NAMESPACE (queues, exchanges, Redis keys) and its own fake-sms on port
//! 0, so tests run in parallel and repeatedly; everything is deleted at the end.
//!
//! Most tests run the worker in-process (`sms_worker::Worker`, stopped through its shutdown
//! future). The SIGTERM and the kill tests run the real `sms-worker` binary as a child process,
//! since only a process receives a signal or dies with its sockets; so does the `dlq` command.

mod ambiguity;
mod at_most_once;
mod dead_letters;
mod failover;
mod harness;
mod operations;
mod outages;
mod processes;
mod receipts;
mod receipts_port;
mod redis_outages;
mod sending;
mod stopping;
mod tokens;
