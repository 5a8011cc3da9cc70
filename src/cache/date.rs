//! HTTP-date parsing (RFC 9110 section 5.6.7) for the cache's freshness and
//! validation decisions: `Date`, `Expires`, `Last-Modified` and
//! `If-Modified-Since`.
//!
//! Recipients must accept all three historical formats (IMF-fixdate, RFC 850
//! and asctime); only the parse direction is needed by the cache.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;

/// Parses an HTTP-date in any of the three formats of RFC 9110 section 5.6.7.
///
/// Returns `None` for anything that is not a valid date. Dates before the
/// Unix epoch are clamped to the epoch (they only ever mean "long ago").
pub fn parse_http_date(text: &str) -> Option<SystemTime> {
    let mut tokens = [""; 6];
    let mut count = 0;
    for token in text.split([' ', ',']).filter(|t| !t.is_empty()) {
        if count == tokens.len() {
            return None;
        }
        tokens[count] = token;
        count += 1;
    }
    let (year, month, day, time) = match count {
        // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        6 if tokens[5] == "GMT" => (
            parse_number(tokens[3], 4)?,
            month_number(tokens[2])?,
            parse_number(tokens[1], 2)?,
            tokens[4],
        ),
        // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
        4 if tokens[3] == "GMT" => {
            let mut parts = tokens[1].split('-');
            let day = parse_number(parts.next()?, 2)?;
            let month = month_number(parts.next()?)?;
            let short_year = parse_number(parts.next()?, 2)?;
            if parts.next().is_some() {
                return None;
            }
            // RFC 9110 5.6.7: a two-digit year more than 50 years in the
            // future is in the past; 70 is the usual fixed pivot.
            let year = if short_year < 70 {
                2000 + short_year
            } else {
                1900 + short_year
            };
            (year, month, day, tokens[2])
        }
        // asctime: Sun Nov  6 08:49:37 1994
        5 => (
            parse_number(tokens[4], 4)?,
            month_number(tokens[1])?,
            parse_number_upto(tokens[2], 2)?,
            tokens[3],
        ),
        _ => return None,
    };
    let mut hms = time.split(':');
    let hour = parse_number(hms.next()?, 2)?;
    let minute = parse_number(hms.next()?, 2)?;
    let second = parse_number(hms.next()?, 2)?;
    if hms.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    if day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let seconds =
        days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second);
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

/// Parses a header value as an HTTP-date; `None` when absent, not text or
/// invalid.
pub fn parse_header_date(value: Option<&HeaderValue>) -> Option<SystemTime> {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date)
}

fn parse_number(text: &str, digits: usize) -> Option<u32> {
    if text.len() != digits {
        return None;
    }
    parse_number_upto(text, digits)
}

fn parse_number_upto(text: &str, digits: usize) -> Option<u32> {
    if text.is_empty() || text.len() > digits || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn month_number(name: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS.iter().position(|m| *m == name).map(|i| i as u32 + 1)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = if year >= 0 { year } else { year - 399 } / 400;
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn parses_the_three_formats_of_rfc_9110() {
        let table: &[(&str, Option<SystemTime>)] = &[
            ("Sun, 06 Nov 1994 08:49:37 GMT", at(784_111_777)),
            ("Sunday, 06-Nov-94 08:49:37 GMT", at(784_111_777)),
            ("Sun Nov  6 08:49:37 1994", at(784_111_777)),
            ("Thu, 01 Jan 1970 00:00:00 GMT", at(0)),
            ("Tue, 29 Feb 2000 12:00:00 GMT", at(951_825_600)),
            ("Wed, 01 Jan 1969 00:00:00 GMT", at(0)),
            ("Fri, 31 Dec 9999 23:59:59 GMT", at(253_402_300_799)),
            ("Mon, 29 Feb 2100 00:00:00 GMT", None),
            ("Sun, 06 Nov 1994 08:49:37 UTC", None),
            ("Sun, 06 Foo 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 24:49:37 GMT", None),
            ("Sun, 6 Nov 1994 08:49:37 GMT", None),
            ("0", None),
            ("-1", None),
            ("", None),
        ];
        for (text, expected) in table {
            assert_eq!(parse_http_date(text), *expected, "{text}");
        }
    }
}
