//! `sms-worker trace`: a number's timeline as text, grouped by event.

use std::fmt::Write as _;

use time::OffsetDateTime;
use time::macros::format_description;

use super::{Line, What};

/// The timeline as the operator reads it: a header with the masked number, then each event's
/// lines in time order.
pub fn print(masked_phone: &str, lines: &[Line]) -> String {
    let mut events: Vec<(&str, Vec<&Line>)> = Vec::new();
    for line in lines {
        match events.iter_mut().find(|(id, _)| *id == line.event_id) {
            Some((_, event)) => event.push(line),
            None => events.push((&line.event_id, vec![line])),
        }
    }
    let mut out = String::new();
    let count = match events.len() {
        1 => "1 event".to_owned(),
        n => format!("{n} events"),
    };
    let _ = writeln!(
        out,
        "{masked_phone}: {count} in the last 24 h, oldest first (times UTC; no codes are kept)"
    );
    for (event_id, mut lines) in events {
        lines.sort_by_key(|line| line.at_ms);
        let _ = writeln!(out, "\nevent {}", crate::terminal::printable(event_id));
        for line in lines {
            // A provider's message id and words are shown as they came, escapes written out.
            let described = crate::terminal::printable(&describe(line));
            let _ = writeln!(out, "  {}  {}", clock(line.at_ms), described);
        }
    }
    out
}

fn clock(at_ms: u64) -> String {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    at.format(format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    ))
    .unwrap_or_default()
}

fn describe(line: &Line) -> String {
    let provider = line.provider.as_deref().unwrap_or("?");
    let status = line.status.as_deref().unwrap_or("?");
    let mut text = match line.what {
        What::Requested => "requested".to_owned(),
        What::Tried => format!("tried {provider}: {status}"),
        What::Ended => format!("ended: {status}"),
        What::Receipt => format!("receipt from {provider}: {status}"),
        What::Resent => format!("resent through {provider}: {status}"),
        What::NotResent => "not resent".to_owned(),
    };
    if let Some(code) = line.code {
        let _ = write!(text, ", error {code}");
    }
    if let Some(id) = &line.message_id {
        let _ = write!(text, " (message {id})");
    }
    if let Some(detail) = &line.detail {
        let _ = write!(text, ": {detail}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_lines_by_event_in_time_order() {
        let line = |event: &str, at_ms, what| {
            let mut line = Line::new(event, what);
            line.at_ms = at_ms;
            line
        };
        let lines = vec![
            line("e1", 1_000, What::Requested),
            line("e1", 1_010, What::Tried)
                .provider("twilio")
                .status("accepted"),
            line("e2", 2_000, What::Requested),
            line("e1", 3_000, What::Receipt)
                .provider("twilio")
                .status("undelivered")
                .code(Some(30007)),
            line("e1", 3_010, What::Resent)
                .provider("infobip")
                .status("accepted"),
        ];
        let text = print("+1415*****00", &lines);
        assert!(text.starts_with("+1415*****00: 2 events"), "{text}");
        let e1 = text.find("event e1").unwrap();
        let e2 = text.find("event e2").unwrap();
        let resent = text.find("resent through infobip: accepted").unwrap();
        assert!(e1 < resent && resent < e2, "{text}");
        assert!(
            text.contains("receipt from twilio: undelivered, error 30007"),
            "{text}"
        );
        assert!(
            text.contains("1970-01-01 00:00:01.010  tried twilio: accepted"),
            "{text}"
        );
        // What a provider answered is shown with its escapes written out.
        let hostile = [line("e3", 4_000, What::Tried)
            .provider("twilio")
            .status("accepted\u{1b}[2J\u{202e}")];
        let text = print("+1415*****00", &hostile);
        assert!(
            !text
                .chars()
                .any(|c| c != '\n' && crate::terminal::unprintable(c)),
            "{text:?}"
        );
        assert!(text.contains(r"accepted\u{1b}[2J\u{202e}"), "{text}");
    }
}
