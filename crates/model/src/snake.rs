//! go-snakecase, ported exactly: the function Segment's warehouses use to turn event,
//! property and trait names into table and column names.
//!
//! The port follows `segmentio/go-snakecase` `snake.go` (last changed in 5e4a23e) byte
//! for byte. It is ASCII and byte-wise: every byte that is not `[A-Za-z0-9]` is a
//! separator, including each byte of a multi-byte UTF-8 character, so non-ASCII letters
//! are dropped. A word is "a run of uppercase letters or digits, then a run of lowercase
//! letters or digits"; words are joined with `_`. Invariants: the output only contains
//! `[a-z0-9_]`, never starts or ends with `_` and never holds `__`; it is a pure function
//! of its input (no locale, no state), so names are stable across releases and nodes.

use std::borrow::Cow;

/// Snake-cases `s` exactly like go-snakecase.
///
/// Borrows the input when it is already snake case (the upstream fast path), so the
/// common case allocates nothing.
///
/// ```
/// use tributary_model::snake::snakecase;
/// assert_eq!(snakecase("Email Delivered"), "email_delivered");
/// assert_eq!(snakecase("CStringRef"), "cstring_ref");
/// assert_eq!(snakecase("context.device.adTrackingEnabled"), "context_device_ad_tracking_enabled");
/// ```
pub fn snakecase(s: &str) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    let len = bytes.len();
    let mut idx = 0;
    let mut has_lower = false;
    let mut has_underscore = false;
    let mut lowercase_since_underscore = false;

    // Fast path: lowercase letters, digits, and `_` when it is neither the first nor the
    // last byte and the next byte is a lowercase letter or a digit.
    while idx < len {
        let c = bytes[idx];
        if is_lower(c) {
            has_lower = true;
            if has_underscore {
                lowercase_since_underscore = true;
            }
        } else if is_digit(c) {
        } else if c == b'_'
            && idx > 0
            && idx < len - 1
            && (is_lower(bytes[idx + 1]) || is_digit(bytes[idx + 1]))
        {
            has_underscore = true;
            lowercase_since_underscore = false;
        } else {
            break;
        }
        idx += 1;
    }

    if idx == len {
        return Cow::Borrowed(s);
    }

    let mut out: Vec<u8> = Vec::with_capacity(len + 8);
    out.extend_from_slice(&bytes[..idx]);

    // Leading uppercase run: joined to what came before without a separator.
    if is_upper(bytes[idx]) && (!has_lower || (has_underscore && !lowercase_since_underscore)) {
        while idx < len && (is_upper(bytes[idx]) || is_digit(bytes[idx])) {
            out.push(bytes[idx].to_ascii_lowercase());
            idx += 1;
        }
        while idx < len && (is_lower(bytes[idx]) || is_digit(bytes[idx])) {
            out.push(bytes[idx]);
            idx += 1;
        }
    }

    while idx < len {
        if !is_alphanumeric(bytes[idx]) {
            idx += 1;
            continue;
        }
        if !out.is_empty() {
            out.push(b'_');
        }
        while idx < len && (is_upper(bytes[idx]) || is_digit(bytes[idx])) {
            out.push(bytes[idx].to_ascii_lowercase());
            idx += 1;
        }
        while idx < len && (is_lower(bytes[idx]) || is_digit(bytes[idx])) {
            out.push(bytes[idx]);
            idx += 1;
        }
    }

    // Only ASCII bytes were pushed (the fast-path prefix is `[a-z0-9_]`), so this never
    // fails; the lossy conversion keeps the function total without an `unwrap`.
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

fn is_upper(c: u8) -> bool {
    c.is_ascii_uppercase()
}

fn is_lower(c: u8) -> bool {
    c.is_ascii_lowercase()
}

fn is_digit(c: u8) -> bool {
    c.is_ascii_digit()
}

fn is_alphanumeric(c: u8) -> bool {
    is_lower(c) || is_upper(c) || is_digit(c)
}

#[cfg(test)]
mod tests {
    use super::snakecase;

    fn check(vectors: &[(&str, &str)]) {
        for (input, expected) in vectors {
            assert_eq!(snakecase(input), *expected, "snakecase({input:?})");
        }
    }

    /// The normative vectors of segment-spec §3.2 (from upstream `snake_test.go`).
    #[test]
    fn matches_every_normative_vector() {
        check(&[
            ("sampleText", "sample_text"),
            ("sample___text", "sample_text"),
            ("sample-text", "sample_text"),
            ("   $#$sample   2    Text   ", "sample_2_text"),
            ("SAMPLE 2 TEXT", "sample_2_text"),
            ("___$$Base64Encode", "base64_encode"),
            ("FOO:BAR$BAZ", "foo_bar_baz"),
            ("something.com", "something_com"),
            ("$something%", "something"),
            ("•¶§ƒ˚foo˙∆˚¬", "foo"),
            ("CStringRef", "cstring_ref"),
            ("THE5r", "the5r"),
            ("5TEst", "5test"),
            ("_5TEst", "5test"),
            ("edf_6N", "edf_6n"),
            ("f_pX9", "f_p_x9"),
            ("p_z9Rg", "p_z9_rg"),
            ("2FA Enabled", "2fa_enabled"),
            ("Enabled 2FA", "enabled_2fa"),
            ("samPLE text", "sam_ple_text"),
            ("lk0B@bFmjrLQ_Z6YL", "lk0_b_b_fmjr_lq_z6yl"),
            ("@49L0S145_¬fwHƒ0TSLNVp", "49l0s145_fw_h_0tslnvp"),
        ]);
    }

    /// The remaining upstream vectors (`snake_test.go` at HEAD and earlier revisions).
    #[test]
    fn matches_the_other_upstream_vectors() {
        check(&[
            ("sample text", "sample_text"),
            ("sample_text", "sample_text"),
            (
                "inviteYourCustomersAddInvites",
                "invite_your_customers_add_invites",
            ),
            ("sample 2 Text", "sample_2_text"),
            ("   sample   2    Text   ", "sample_2_text"),
            ("FOO#BAR#BAZ", "foo_bar_baz"),
        ]);
    }

    /// The derived examples of segment-spec §3.2.
    #[test]
    fn matches_the_derived_examples() {
        check(&[
            ("Email Delivered", "email_delivered"),
            ("Email Link Clicked", "email_link_clicked"),
            ("Email Marked as Spam", "email_marked_as_spam"),
            ("Email Unsubscribed", "email_unsubscribed"),
            ("accountType", "account_type"),
            ("campaignID", "campaign_id"),
            ("iOS Version", "i_os_version"),
            (
                "context.device.adTrackingEnabled",
                "context_device_ad_tracking_enabled",
            ),
            ("Ünïcode name", "n_code_name"),
        ]);
    }

    #[test]
    fn borrows_input_that_is_already_snake_case() {
        assert!(matches!(
            snakecase("email_delivered"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(matches!(snakecase("a1_b2"), std::borrow::Cow::Borrowed(_)));
        assert!(matches!(snakecase("Email"), std::borrow::Cow::Owned(_)));
    }

    #[test]
    fn handles_empty_and_separator_only_input() {
        check(&[
            ("", ""),
            ("_", ""),
            ("___", ""),
            ("a_", "a"),
            ("_a", "a"),
            ("🎉", ""),
            ("\"; DROP TABLE x; --", "drop_table_x"),
            ("Tracks", "tracks"),
            ("USERS", "users"),
        ]);
    }

    #[test]
    fn output_alphabet_is_snake_case_for_hostile_input() {
        let inputs = [
            "a\"b'c`d",
            "x\u{0}y",
            "ÀÉÎõü",
            "日本語のイベント",
            "__init__",
            "A_B_C",
            "a__B",
            "9lives",
            "x-Y-z",
            "trailing_",
        ];
        for input in inputs {
            let out = snakecase(input);
            assert!(
                out.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{input:?} -> {out:?}"
            );
            assert!(
                !out.starts_with('_') && !out.ends_with('_'),
                "{input:?} -> {out:?}"
            );
            assert!(!out.contains("__"), "{input:?} -> {out:?}");
        }
    }
}
