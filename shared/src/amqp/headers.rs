//! Reading AMQP header values, which arrive in whichever integer or string width the publisher
//! chose (RabbitMQ's own `x-death` uses other widths than our publishers).

use lapin::types::{AMQPValue, FieldTable};

/// The header `name` as text, if it is a string of either width.
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    value_str(headers?.inner().get(name)?)
}

/// The header `name` as an integer, whatever width it was sent in (or a string of digits).
pub fn header_int(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    value_int(headers?.inner().get(name)?)
}

pub fn value_str(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn value_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            value_str(value)?.trim().parse().ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_strings_and_integers_of_any_width() {
        let mut headers = FieldTable::default();
        headers.insert("id".into(), AMQPValue::LongString("req-42".into()));
        headers.insert("short".into(), AMQPValue::ShortString("s".into()));
        headers.insert("n".into(), AMQPValue::ShortUInt(7));
        headers.insert("digits".into(), AMQPValue::LongString(" 21211 ".into()));
        let headers = Some(&headers);
        assert_eq!(header_str(headers, "id").as_deref(), Some("req-42"));
        assert_eq!(header_str(headers, "short").as_deref(), Some("s"));
        assert_eq!(header_str(headers, "n"), None);
        assert_eq!(header_int(headers, "n"), Some(7));
        assert_eq!(header_int(headers, "digits"), Some(21211));
        assert_eq!(header_int(headers, "id"), None);
        assert_eq!(header_str(None, "id"), None);
    }
}
