//! The SMS body: the template for the event's language filled in, then the lines that let a
//! phone fill the code in by itself: WebOTP's `@DOMAIN #CODE` and Android's app hash.

use crate::config::MessageConfig;

/// Fills in `{app}`, `{code}` and `{minutes}` in the template for `locale` (`SMS_TEMPLATE_ES` for
/// `es-MX`, say; `SMS_TEMPLATE` when there is none), and appends, as the last line:
/// - `@DOMAIN #CODE` when `WEBOTP_DOMAIN` is set: the origin-bound format that the WebOTP API,
///   Safari's autofill and Android read;
/// - the 11-character `ANDROID_APP_HASH`, which Android's SMS Retriever wants at the very end of
///   the message. With WebOTP as well it goes on the same line after the code, so that both
///   readers find what they look for: the WebOTP line is still the last line, and the message
///   still ends with the hash.
pub fn render(
    config: &MessageConfig,
    code: &str,
    millis_left: u64,
    locale: Option<&str>,
) -> String {
    // Rounded up: "expires in 0 minutes" would be wrong while the code still works.
    let minutes = millis_left.div_ceil(60_000).max(1);
    let mut body = template_for(config, locale)
        .replace("{app}", &config.app_name)
        .replace("{minutes}", &minutes.to_string())
        .replace("{code}", code);
    match (&config.webotp_domain, &config.android_app_hash) {
        (Some(domain), Some(hash)) => body.push_str(&format!("\n\n@{domain} #{code} {hash}")),
        (Some(domain), None) => body.push_str(&format!("\n\n@{domain} #{code}")),
        (None, Some(hash)) => body.push_str(&format!("\n\n{hash}")),
        (None, None) => {}
    }
    body
}

/// The body with the code hidden, for the log provider: a log line never carries an OTP.
pub fn render_masked(
    config: &MessageConfig,
    code: &str,
    millis_left: u64,
    locale: Option<&str>,
) -> String {
    render(
        config,
        &"*".repeat(code.chars().count()),
        millis_left,
        locale,
    )
}

/// The most specific template for `locale`: `pt-BR` takes `SMS_TEMPLATE_PT_BR`, else
/// `SMS_TEMPLATE_PT`, else `SMS_TEMPLATE`.
fn template_for<'a>(config: &'a MessageConfig, locale: Option<&str>) -> &'a str {
    let Some(locale) = locale else {
        return &config.template;
    };
    let mut tag = locale.to_ascii_lowercase().replace('_', "-");
    loop {
        if let Some(template) = config.templates.get(&tag) {
            return template;
        }
        match tag.rfind('-') {
            Some(cut) => tag.truncate(cut),
            None => return &config.template,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(webotp: Option<&str>, hash: Option<&str>) -> MessageConfig {
        MessageConfig {
            template: crate::config::DEFAULT_SMS_TEMPLATE.to_owned(),
            app_name: crate::config::DEFAULT_APP_NAME.to_owned(),
            webotp_domain: webotp.map(str::to_owned),
            templates: HashMap::from([
                ("es".to_owned(), "Tu código de {app} es {code}.".to_owned()),
                ("pt-br".to_owned(), "Seu código: {code}".to_owned()),
            ]),
            android_app_hash: hash.map(str::to_owned),
        }
    }

    #[test]
    fn fills_in_the_template() {
        assert_eq!(
            render(&config(None, None), "123456", 300_000, None),
            "Your sign-in code is 123456. It expires in 5 minutes."
        );
        assert_eq!(
            render(&config(None, None), "123456", 61_000, None),
            "Your sign-in code is 123456. It expires in 2 minutes."
        );
    }

    #[test]
    fn picks_the_template_of_the_language() {
        let c = config(None, None);
        assert_eq!(
            render(&c, "1234", 60_000, Some("es")),
            "Tu código de sign-in es 1234."
        );
        assert_eq!(
            render(&c, "1234", 60_000, Some("es-MX")),
            "Tu código de sign-in es 1234."
        );
        assert_eq!(
            render(&c, "1234", 60_000, Some("pt-BR")),
            "Seu código: 1234"
        );
        assert!(render(&c, "1234", 60_000, Some("pt")).starts_with("Your sign-in code"));
        assert!(render(&c, "1234", 60_000, Some("fr")).starts_with("Your sign-in code"));
    }

    #[test]
    fn appends_the_webotp_line_and_the_app_hash() {
        assert_eq!(
            render(&config(Some("example.com"), None), "4242", 120_000, None),
            "Your sign-in code is 4242. It expires in 2 minutes.\n\n@example.com #4242"
        );
        assert_eq!(
            render(&config(None, Some("FA+9qCX9VSu")), "4242", 120_000, None),
            "Your sign-in code is 4242. It expires in 2 minutes.\n\nFA+9qCX9VSu"
        );
        let both = render(
            &config(Some("example.com"), Some("FA+9qCX9VSu")),
            "4242",
            120_000,
            None,
        );
        assert!(
            both.ends_with("\n\n@example.com #4242 FA+9qCX9VSu"),
            "{both}"
        );
    }

    #[test]
    fn the_masked_body_has_no_code() {
        let masked = render_masked(&config(Some("example.com"), None), "123456", 300_000, None);
        assert_eq!(
            masked,
            "Your sign-in code is ******. It expires in 5 minutes.\n\n@example.com #******"
        );
    }
}
