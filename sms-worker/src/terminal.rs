//! Text the CLI prints to an operator's terminal. What it shows (dead letters' headers, a
//! number's timeline) came from providers, proxies and whoever can publish to the broker: an
//! escape sequence printed as is would act on the terminal, and a bidirectional mark or an
//! invisible character would make two ids look alike.

use serde::Serialize;

/// Control characters (C0, DEL, C1: terminal escapes), line and paragraph separators, the marks
/// that reorder text on screen (bidirectional marks, overrides, isolates), and the invisible ones
/// that make two ids look alike (zero-width, word joiners, the byte-order mark, tag characters).
pub fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

/// `text` with every [`unprintable`] character written out (`\u{1b}`), and the backslash too,
/// so that a provider's own text `\u{1b}` stays told apart.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\\' || unprintable(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `value` as a line of JSON with every [`unprintable`] character escaped (`\u009b`): serde
/// escapes C0 controls, but not DEL, C1 (an 8-bit escape) or the bidirectional marks, and
/// `--json` output is read on terminals too.
pub fn json_line(value: &impl Serialize) -> serde_json::Result<String> {
    let json = serde_json::to_string(value)?;
    let mut line = String::with_capacity(json.len());
    for c in json.chars() {
        if unprintable(c) {
            // One \u escape per UTF-16 unit: a surrogate pair beyond the first plane.
            for unit in c.encode_utf16(&mut [0; 2]) {
                line.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            line.push(c);
        }
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_would_act_on_a_terminal_and_keeps_json_json() {
        let hostile = "ok \u{1b}[2J\r\n\u{9b}2J \u{202e}desrever \u{e0041}\u{200b} C:\\x";
        let shown = printable(hostile);
        assert!(!shown.chars().any(unprintable), "{shown:?}");
        assert!(shown.starts_with(r"ok \u{1b}[2J\r\n"), "{shown}");
        assert!(
            shown.ends_with(r"C:\\x"),
            "a backslash is written out too: {shown}"
        );
        let json = json_line(&serde_json::json!({ "text": hostile })).expect("JSON");
        assert!(!json.chars().any(unprintable), "{json:?}");
        let read: serde_json::Value = serde_json::from_str(&json).expect("still JSON");
        assert_eq!(read["text"], hostile, "the same text, escaped");
        assert_eq!(printable("plain text"), "plain text");
    }
}
