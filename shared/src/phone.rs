/// Masks a phone number for logs: `+14155550100` becomes `+1415*****00`.
///
/// The country and area code stay readable for debugging; the subscriber part does not.
pub fn mask_phone(phone: &str) -> String {
    let chars: Vec<char> = phone.chars().collect();
    let (head, tail) = if chars.len() >= 10 {
        (5, 2)
    } else if chars.len() >= 6 {
        (2, 2)
    } else {
        (0, 0)
    };
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i < head || i >= chars.len() - tail {
                *c
            } else {
                '*'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::mask_phone;

    #[test]
    fn masks_the_subscriber_part() {
        assert_eq!(mask_phone("+14155550100"), "+1415*****00");
        assert_eq!(mask_phone("+919876543210"), "+9198******10");
        assert_eq!(mask_phone("1234567"), "12***67");
        assert_eq!(mask_phone("123"), "***");
        assert_eq!(mask_phone(""), "");
    }
}
