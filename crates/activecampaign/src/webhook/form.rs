//! Parsing an ActiveCampaign webhook body (`application/x-www-form-urlencoded`) into
//! a flat, ordered list of `(key, value)` pairs.
//!
//! ActiveCampaign posts PHP-style bracketed keys whose nesting is irregular
//! (`contact[fields][32]`, `list[][id]`, `campaign[message][subject]`) and whose keys
//! may repeat, so the body is never deserialized into a rigid struct: [`FormPairs`]
//! keeps every pair, in body order, and the mapping reads what it knows.
//!
//! Invariants:
//! - [`parse_form`] never panics and allocates at most [`MAX_PAIRS`] pairs.
//! - `Ok` means the body is text with at least one `key=value` pair; it says nothing
//!   about whether a `type` key is present (that is [`super::map_webhook`]'s concern).
//! - Percent-decoded bytes that are not UTF-8 are accepted **lossily** (each bad
//!   sequence becomes U+FFFD). ActiveCampaign never retries a delivery, so refusing a
//!   whole email event because one contact name was sent in Latin-1 would lose it for
//!   good; a replacement character in a name is the lesser harm.
//! - A body that is clearly not form data is refused: empty (or whitespace only),
//!   JSON (`{…}` / `[…]`), raw bytes that are not UTF-8 text or contain control
//!   characters, or text with no `key=value` pair at all.
//! - Keys are trimmed of ASCII whitespace (a body wrapped over lines must still be
//!   read); values are kept exactly as decoded.

use std::borrow::Cow;

/// Most pairs one body may hold. ActiveCampaign sends a few dozen; anything near this
/// bound is not a webhook, and the bound keeps a hostile body from costing more than
/// its (already capped) size in small allocations.
pub const MAX_PAIRS: usize = 10_000;

/// A webhook body as a flat list of `(key, value)` pairs: keys repeat, order is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FormPairs(pub Vec<(String, String)>);

impl FormPairs {
    /// The value of the first pair whose key is exactly `key`.
    ///
    /// ActiveCampaign does not repeat scalar keys; when a body does, the first wins.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value whose key is exactly `key`, in body order (e.g. `list[][id]`).
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first value for `key`, trimmed, or `None` when absent or blank.
    pub fn get_trimmed(&self, key: &str) -> Option<&str> {
        self.get(key).map(str::trim).filter(|v| !v.is_empty())
    }

    /// All pairs in body order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for FormPairs {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        FormPairs(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Why a body is not an ActiveCampaign webhook form. The messages are safe to return
/// to the client in a `400 {code,message}` body: they describe the input, not us.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The body is empty or only whitespace.
    #[error("empty body: expected an application/x-www-form-urlencoded ActiveCampaign webhook")]
    Empty,
    /// The body starts like JSON.
    #[error(
        "body looks like JSON: ActiveCampaign webhooks are application/x-www-form-urlencoded \
         (send Segment JSON to /v1/track or /v1/batch instead)"
    )]
    LooksLikeJson,
    /// The raw body is not UTF-8 text, or contains control characters.
    #[error("body is not form data: byte {byte:#04x} at offset {offset} is not text")]
    NotText {
        /// Offset of the first offending byte in the raw body.
        offset: usize,
        /// The offending byte.
        byte: u8,
    },
    /// The body is text but holds no `key=value` pair.
    #[error("body is not form data: no key=value pair found")]
    NoPairs,
    /// The body holds more pairs than [`MAX_PAIRS`].
    #[error("body has more than {max} key=value pairs")]
    TooManyPairs {
        /// The bound that was exceeded.
        max: usize,
    },
}

/// Parses a webhook body into pairs. See the module docs for what is refused and why.
pub fn parse_form(body: &[u8]) -> Result<FormPairs, ParseError> {
    let body = body.trim_ascii();
    if body.is_empty() {
        return Err(ParseError::Empty);
    }
    if matches!(body.first(), Some(b'{' | b'[')) {
        return Err(ParseError::LooksLikeJson);
    }
    check_text(body)?;
    let has_pair = body.split(|b| *b == b'&').any(|segment| {
        segment
            .iter()
            .position(|b| *b == b'=')
            .is_some_and(|i| i > 0)
    });
    if !has_pair {
        return Err(ParseError::NoPairs);
    }

    let mut pairs = Vec::new();
    for (key, value) in pairs_of(body) {
        let key = match key {
            Cow::Borrowed(k) => k.trim_ascii().to_owned(),
            Cow::Owned(k) => {
                let trimmed = k.trim_ascii();
                if trimmed.len() == k.len() {
                    k
                } else {
                    trimmed.to_owned()
                }
            }
        };
        if key.is_empty() {
            continue;
        }
        if pairs.len() == MAX_PAIRS {
            return Err(ParseError::TooManyPairs { max: MAX_PAIRS });
        }
        pairs.push((key, value.into_owned()));
    }
    if pairs.is_empty() {
        // e.g. `=x&=y`: only empty keys.
        return Err(ParseError::NoPairs);
    }
    Ok(FormPairs(pairs))
}

/// The `(name, value)` pairs of a form body, decoded exactly as
/// `form_urlencoded::parse` decodes them (empty `&`-segments skipped, a segment
/// without `=` has an empty value, `+` is a space, `%XX` a byte and any other `%`
/// itself, the result UTF-8 with invalid sequences replaced), in one pass per
/// field and borrowing fields that hold neither `+` nor `%`. `form_urlencoded`
/// took ~45 k instructions for a 700-byte webhook (issue #15 profile): a `+`
/// replacement copy, then a percent decoder fed byte by byte through iterators.
fn pairs_of(body: &[u8]) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    body.split(|b| *b == b'&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| match segment.iter().position(|b| *b == b'=') {
            Some(i) => (decode(&segment[..i]), decode(&segment[i + 1..])),
            None => (decode(segment), Cow::Borrowed("")),
        })
}

fn decode(field: &[u8]) -> Cow<'_, str> {
    if !field.iter().any(|b| matches!(b, b'+' | b'%')) {
        return String::from_utf8_lossy(field);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while let Some(&b) = field.get(i) {
        i += 1;
        match b {
            b'+' => out.push(b' '),
            b'%' => match (
                field.get(i).copied().and_then(hex),
                field.get(i + 1).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            _ => out.push(b),
        }
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

/// Raw bodies must be UTF-8 text without control characters (tab, CR and LF allowed).
/// The error names the first offending byte.
fn check_text(body: &[u8]) -> Result<(), ParseError> {
    let control = body
        .iter()
        .position(|b| b.is_ascii_control() && !matches!(b, b'\t' | b'\r' | b'\n'));
    let invalid = std::str::from_utf8(body).err().map(|e| e.valid_up_to());
    let offset = match (control, invalid) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return Ok(()),
    };
    Err(ParseError::NotText {
        offset,
        byte: body.get(offset).copied().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_field_as_form_urlencoded_does() {
        let bodies: [&[u8]; 12] = [
            b"a=b&c=d",
            b"a+b=c+d&&&e",
            b"k=%41%62%2b%2B%7e",
            b"k=%4&l=%&m=%zz&n=%4g&o=100%",
            b"k=%+2&l=%2+&m=++%20",
            b"=v&k=&=&k2",
            b"k=a=b=c",
            b"n=Jos%C3%A9&m=%FFok&o=%C3",
            "raw=Zoë+&x=%E2%82%AC".as_bytes(),
            b"contact%5Bfields%5D%5B32%5D=2024-12-31&contact%5Bemail%5D=c1%40example.com",
            b"&leading&trailing&",
            b"k=%E2%82",
        ];
        for body in bodies {
            let ours: Vec<(String, String)> = pairs_of(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let reference: Vec<(String, String)> = form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            assert_eq!(ours, reference, "{:?}", String::from_utf8_lossy(body));
        }
    }

    proptest::proptest! {
        #[test]
        fn the_decoder_matches_form_urlencoded_on_any_bytes(
            body in proptest::collection::vec(
                proptest::sample::select(b"ab=&+%0fFgz\xc3\xa9\xff ".to_vec()),
                0..80,
            )
        ) {
            let ours: Vec<(String, String)> = pairs_of(&body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let reference: Vec<(String, String)> = form_urlencoded::parse(&body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            proptest::prop_assert_eq!(ours, reference);
        }
    }

    #[test]
    fn keeps_repeated_keys_in_order() {
        let pairs =
            parse_form(b"list%5B%5D%5Bid%5D=3&type=unsubscribe&list%5B%5D%5Bid%5D=7").unwrap();
        assert_eq!(pairs.get_all("list[][id]").collect::<Vec<_>>(), ["3", "7"]);
        assert_eq!(pairs.get("type"), Some("unsubscribe"));
        assert_eq!(pairs.len(), 3);
    }

    #[test]
    fn first_of_repeated_scalar_wins() {
        let pairs = parse_form(b"type=open&type=click").unwrap();
        assert_eq!(pairs.get("type"), Some("open"));
    }

    #[test]
    fn decodes_plus_and_percent() {
        let pairs = parse_form(b"campaign%5Bname%5D=March+newsletter&u=a%40b.c%26d").unwrap();
        assert_eq!(pairs.get("campaign[name]"), Some("March newsletter"));
        assert_eq!(pairs.get("u"), Some("a@b.c&d"));
    }

    #[test]
    fn decodes_utf8_and_replaces_invalid_sequences() {
        let pairs = parse_form(b"n=Jos%C3%A9&m=%FFok").unwrap();
        assert_eq!(pairs.get("n"), Some("José"));
        assert_eq!(pairs.get("m"), Some("\u{FFFD}ok"));
    }

    #[test]
    fn accepts_raw_utf8_and_trailing_newline() {
        let pairs = parse_form("type=open&n=Zoë\r\n".as_bytes()).unwrap();
        assert_eq!(pairs.get("n"), Some("Zoë"));
    }

    #[test]
    fn key_without_value_is_kept_empty() {
        let pairs = parse_form(b"type=open&flag").unwrap();
        assert_eq!(pairs.get("flag"), Some(""));
        assert_eq!(pairs.get_trimmed("flag"), None);
    }

    #[test]
    fn rejects_empty_and_whitespace() {
        assert_eq!(parse_form(b""), Err(ParseError::Empty));
        assert_eq!(parse_form(b" \r\n\t"), Err(ParseError::Empty));
    }

    #[test]
    fn rejects_json() {
        assert_eq!(
            parse_form(br#"{"type":"open"}"#),
            Err(ParseError::LooksLikeJson)
        );
        assert_eq!(
            parse_form(br#" [{"a=b":1}]"#),
            Err(ParseError::LooksLikeJson)
        );
    }

    #[test]
    fn rejects_binary() {
        assert!(matches!(
            parse_form(&[0x1f, 0x8b, 0x08, 0x00, b'=', b'x']),
            Err(ParseError::NotText {
                offset: 0,
                byte: 0x1f
            })
        ));
        assert!(matches!(
            parse_form(b"type=open&x=\xff\xfe"),
            Err(ParseError::NotText {
                offset: 12,
                byte: 0xff
            })
        ));
    }

    #[test]
    fn rejects_text_without_pairs() {
        assert_eq!(parse_form(b"hello world"), Err(ParseError::NoPairs));
        assert_eq!(parse_form(b"=x&=y"), Err(ParseError::NoPairs));
        assert_eq!(parse_form(b"&&&"), Err(ParseError::NoPairs));
    }

    #[test]
    fn bounds_the_number_of_pairs() {
        let body = "a=1&".repeat(MAX_PAIRS + 1);
        assert_eq!(
            parse_form(body.as_bytes()),
            Err(ParseError::TooManyPairs { max: MAX_PAIRS })
        );
        let body = "a=1&".repeat(MAX_PAIRS);
        assert_eq!(parse_form(body.as_bytes()).map(|p| p.len()), Ok(MAX_PAIRS));
    }

    #[test]
    fn error_messages_are_human() {
        assert_eq!(
            ParseError::NoPairs.to_string(),
            "body is not form data: no key=value pair found"
        );
        assert!(
            ParseError::LooksLikeJson
                .to_string()
                .contains("x-www-form-urlencoded")
        );
    }
}
