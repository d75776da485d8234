//! The language of the SMS: the request's `locale` field, else the best language of its
//! `Accept-Language` header. Carried in the event; the worker picks `SMS_TEMPLATE_<LANG>`.

use axum::http::HeaderMap;
use axum::http::header::ACCEPT_LANGUAGE;

use crate::error::ApiError;

/// Longer tags exist in BCP 47, but not for anything an SMS template is written in.
const MAX_TAG_LEN: usize = 35;

/// The locale for the SMS, or `None` for the default template. A `locale` the client sent that
/// is not a language tag is refused; a header that cannot be read is ignored, as browsers send
/// all sorts.
pub fn choose(explicit: Option<&str>, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    if let Some(tag) = explicit {
        return normalize(tag).map(Some).ok_or_else(|| {
            ApiError::InvalidRequest("locale must be a language tag such as es or pt-BR".to_owned())
        });
    }
    let Some(header) = headers.get(ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    Ok(best_language(header))
}

/// The highest-weighted tag of an `Accept-Language` header (`*` and `q=0` skipped; the first
/// of equals wins).
fn best_language(header: &str) -> Option<String> {
    let mut best: Option<(f32, String)> = None;
    for item in header.split(',').take(32) {
        let mut parts = item.split(';');
        let Some(tag) = parts.next().map(str::trim).and_then(normalize) else {
            continue;
        };
        let weight = parts
            .find_map(|p| p.trim().strip_prefix("q="))
            .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok())
            .unwrap_or(0.0);
        if weight > 0.0 && best.as_ref().is_none_or(|(w, _)| weight > *w) {
            best = Some((weight, tag));
        }
    }
    best.map(|(_, tag)| tag)
}

/// `es`, `pt-BR`, `zh-Hant-TW`: a language of 2 or 3 letters, then subtags of letters and
/// digits; the language lower case, a two-letter region upper case.
fn normalize(tag: &str) -> Option<String> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return None;
    }
    let mut parts = tag.split(['-', '_']);
    let language = parts.next()?;
    if !(2..=3).contains(&language.len()) || !language.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let mut out = language.to_ascii_lowercase();
    for subtag in parts {
        if subtag.is_empty()
            || subtag.len() > 8
            || !subtag.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return None;
        }
        out.push('-');
        if subtag.len() == 2 {
            out.push_str(&subtag.to_ascii_uppercase());
        } else {
            out.push_str(subtag);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_LANGUAGE, value.parse().unwrap());
        headers
    }

    #[test]
    fn the_field_wins_and_must_be_a_tag() {
        let headers = with_header("de");
        assert_eq!(
            choose(Some("pt_br"), &headers).unwrap().as_deref(),
            Some("pt-BR")
        );
        assert!(choose(Some("español"), &headers).is_err());
        assert!(choose(Some(""), &headers).is_err());
        assert!(choose(Some(&"a".repeat(40)), &headers).is_err());
    }

    #[test]
    fn the_header_gives_its_best_language() {
        let best = |h: &str| choose(None, &with_header(h)).unwrap();
        assert_eq!(best("fr-CH, fr;q=0.9, en;q=0.8").as_deref(), Some("fr-CH"));
        assert_eq!(best("en;q=0.5, es;q=0.9").as_deref(), Some("es"));
        assert_eq!(best("*, de;q=0.1").as_deref(), Some("de"));
        assert_eq!(best("es;q=0").as_deref(), None);
        assert_eq!(best("not a language!!").as_deref(), None);
        assert_eq!(choose(None, &HeaderMap::new()).unwrap(), None);
    }
}
