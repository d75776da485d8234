//! A sent code the api never made current, made current when its user enters it.
//!
//! The api makes a code current once the broker confirmed its event (`promotion`). That step can
//! fail to run at all: the api killed between the confirm and the promotion (SIGKILL, the OOM
//! killer), or stopped while Redis was away for longer than its shutdown waits. The code then
//! stays pending in Redis while its SMS goes out, and the user would hold a code that never
//! works, then wait out the resend gap for another.
//!
//! So a sign-in that finds a pending code asks the worker's send ledger (`shared::send_ledger`)
//! about its event first. `sent` (the provider accepted the SMS) proves that the broker stored
//! the event, which is all the confirm would have said, and that the user may hold the code, so
//! the code is made current as the api would have made it, and then the guess is checked.
//! Anything else leaves the pending code alone: no record yet (its confirm may still come),
//! `sending` (a claim, which its worker may still give up, and the api then withdraw the event),
//! withdrawn or dead-lettered (no SMS went).
//!
//! The usual sign-in finds no pending code, at the cost of one HMGET inside its script. Whether
//! the ledger is asked depends only on the pending code being there (and, for a guess that
//! carries a `challenge_id`, on its being the pending code's), never on the code guessed, so the
//! extra step tells a guesser nothing about the code (its timing does tell that the number has a
//! code pending, which a request's resend-gap 429 tells as well). The ledger lives on another
//! Redis Cluster slot than the phone's codes: if it cannot be read, the guess is checked against
//! the current code all the same.
//!
//! A sign-in that carries a `challenge_id` must carry the late code's own: a client whose api
//! died before answering holds only the previous request's, and that guess is checked against
//! the current code alone, as if nothing were pending: the late code typed in is a wrong guess
//! for the previous one, and counts as one. So a made-up `challenge_id` costs one script, as it
//! does with no code pending, not the ledger's lookup and a second check.

use std::time::Duration;

use shared::PhoneNumber;
use shared::send_ledger::{self, Record};
use tokio::time::Instant;
use uuid::Uuid;

use super::{REDIS_DEADLINE, redis_step_by};
use crate::error::ApiError;
use crate::metrics as m;
use crate::otp::store::{CheckOutcome, CheckedGuess, Promotion};
use crate::state::AppState;

/// Checks `guess` against the phone's current code, after making a pending code current if its
/// SMS went.
pub async fn check_guess(
    state: &AppState,
    phone: &PhoneNumber,
    guess: &CheckedGuess<'_>,
) -> Result<CheckOutcome, ApiError> {
    let store = &state.otp_store;
    // The check and the steps a late promotion adds share one Redis step's time, so that a
    // sign-in still fits the request's 10 s with the others (see the module doc of `signin`).
    let give_up_at = Instant::now() + REDIS_DEADLINE;
    let checked = redis_step_by(
        give_up_at,
        store.check_guess(state.redis(), phone, guess, true),
    )
    .await?;
    let CheckOutcome::Pending { event_id } = checked else {
        return Ok(checked);
    };
    if let Some(event_id) = event_id
        && let Err(e) = promote_if_sent(state, phone, event_id, give_up_at - LOOKUP_LEAVES).await
    {
        tracing::warn!(error = %e, %event_id, "could not look into a pending code; checking the guess against the current code");
    }
    // Asked not to report a pending code, CHECK cannot answer `Pending` this time.
    redis_step_by(
        give_up_at,
        store.check_guess(state.redis(), phone, guess, false),
    )
    .await
}

/// Of the time the late promotion adds, what its lookup leaves for checking the guess.
const LOOKUP_LEAVES: Duration = Duration::from_secs(1);

async fn promote_if_sent(
    state: &AppState,
    phone: &PhoneNumber,
    event_id: Uuid,
    give_up_at: Instant,
) -> Result<(), ApiError> {
    let record = send_ledger::key(&state.config.common.namespace, event_id);
    let held: Option<String> = redis_step_by(give_up_at, async {
        redis::cmd("GET")
            .arg(&record)
            .query_async(&mut state.redis())
            .await
    })
    .await?;
    if held.as_deref().and_then(Record::parse) != Some(Record::Sent) {
        return Ok(());
    }
    // Counted only when this sign-in made it current, not when the api's own promotion (or a
    // concurrent sign-in) got there first.
    if redis_step_by(
        give_up_at,
        state.otp_store.promote(state.redis(), phone, event_id),
    )
    .await?
        == Promotion::Promoted
    {
        metrics::counter!(m::PROMOTIONS_AT_SIGN_IN).increment(1);
        tracing::warn!(%phone, %event_id, "a sign-in found a code that was sent but not yet made current (its promotion after the confirm did not run, or had yet to); it is current now");
    }
    Ok(())
}
