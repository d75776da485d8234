//! The SMS body: `SMS_TEMPLATE` filled in, plus the WebOTP line when `WEBOTP_DOMAIN` is set.

use crate::config::MessageConfig;

/// Fills in `{app}`, `{code}` and `{minutes}`, and appends `@DOMAIN #CODE` as the last line,
/// the format the WebOTP API and Android's SMS Retriever look for.
pub fn render(config: &MessageConfig, code: &str, millis_left: u64) -> String {
    // Rounded up: "expires in 0 minutes" would be wrong while the code still works.
    let minutes = millis_left.div_ceil(60_000).max(1);
    let mut body = config
        .template
        .replace("{app}", &config.app_name)
        .replace("{minutes}", &minutes.to_string())
        .replace("{code}", code);
    if let Some(domain) = &config.webotp_domain {
        body.push_str(&format!("\n\n@{domain} #{code}"));
    }
    body
}

/// The body with the code hidden, for the log provider: a log line never carries an OTP.
pub fn render_masked(config: &MessageConfig, code: &str, millis_left: u64) -> String {
    render(config, &"*".repeat(code.chars().count()), millis_left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(webotp: Option<&str>) -> MessageConfig {
        MessageConfig {
            template: crate::config::DEFAULT_SMS_TEMPLATE.to_owned(),
            app_name: "Cheershare".to_owned(),
            webotp_domain: webotp.map(str::to_owned),
        }
    }

    #[test]
    fn fills_in_the_template() {
        assert_eq!(
            render(&config(None), "123456", 300_000),
            "Your Cheershare code is 123456. It expires in 5 minutes."
        );
        assert_eq!(
            render(&config(None), "123456", 61_000),
            "Your Cheershare code is 123456. It expires in 2 minutes."
        );
        assert_eq!(
            render(&config(None), "123456", 5_000),
            "Your Cheershare code is 123456. It expires in 1 minutes."
        );
    }

    #[test]
    fn appends_the_webotp_line() {
        assert_eq!(
            render(&config(Some("example.com")), "4242", 120_000),
            "Your Cheershare code is 4242. It expires in 2 minutes.\n\n@example.com #4242"
        );
    }

    #[test]
    fn the_masked_body_has_no_code() {
        let masked = render_masked(&config(Some("example.com")), "123456", 300_000);
        assert_eq!(
            masked,
            "Your Cheershare code is ******. It expires in 5 minutes.\n\n@example.com #******"
        );
    }
}
