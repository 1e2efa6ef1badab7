//! `--log-format json`: one JSON object per event, the same shape tracing-subscriber's
//! flattened JSON format writes (`timestamp`, `level`, `message` and the event's fields at
//! the top level, `target`), written straight into the line buffer.
//!
//! Why not tracing-subscriber's own JSON format: it goes through serde and formats every
//! `%display` field into a fresh `String` first; with an access log line per HTTP request
//! that was about a tenth of the proxy's CPU per request. This writer escapes as it goes and
//! allocates nothing.
use std::{
    cell::RefCell,
    fmt::{self, Write as _},
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// The JSON line format (see the module docs).
pub struct JsonLines;

thread_local! {
    /// The line being formatted. A concrete `String` rather than the subscriber's
    /// `dyn fmt::Write`, so that the many small writes of a line are inlined pushes.
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(1024));
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                write_event(&mut *line, event, SystemTime::now())?;
                writer.write_str(&line)
            }
            // An event logged while formatting one (a field's Display logging): no scratch.
            Err(_) => write_event(&mut writer, event, SystemTime::now()),
        })
    }
}

fn write_event(out: &mut impl fmt::Write, event: &Event<'_>, now: SystemTime) -> fmt::Result {
    let meta = event.metadata();
    out.write_str("{\"timestamp\":\"")?;
    write_timestamp(out, now)?;
    out.write_str("\",\"level\":\"")?;
    out.write_str(meta.level().as_str())?;
    out.write_char('"')?;
    let mut fields = Fields {
        out: &mut *out,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    out.write_str(",\"target\":")?;
    write_str(out, meta.target())?;
    out.write_str("}\n")
}

/// Writes each field as `,"name":value`.
struct Fields<'a, W> {
    out: &'a mut W,
    result: fmt::Result,
}

impl<W: fmt::Write> Fields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.out.write_char(',')?;
            write_str(self.out, field.name())?;
            self.out.write_char(':')?;
            value(self.out)
        })();
    }
}

impl<W: fmt::Write> tracing::field::Visit for Fields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_str(out, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write_u64(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| {
            if value < 0 {
                out.write_char('-')?;
            }
            write_u64(out, value.unsigned_abs())
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.field(field, |out| write!(out, "{value}"));
        } else {
            self.field(field, |out| out.write_str("null"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(Escaped(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// Decimal digits of `value` (what `{value}` writes, without the formatting machinery).
fn write_u64(out: &mut impl fmt::Write, value: u64) -> fmt::Result {
    write_padded(out, value, 1)
}

/// Decimal digits of `value`, zero-padded to at least `width` (at most 20).
fn write_padded(out: &mut impl fmt::Write, mut value: u64, width: usize) -> fmt::Result {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    while value > 0 || digits.len() - start < width.clamp(1, 20) {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
    }
    // Only ASCII digits were written.
    out.write_str(std::str::from_utf8(&digits[start..]).map_err(|_| fmt::Error)?)
}

/// A JSON string literal.
fn write_str(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(&mut *out).write_str(s)?;
    out.write_char('"')
}

/// Escapes what is written through it for the inside of a JSON string.
struct Escaped<W>(W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Everything to escape is ASCII, so scanning bytes never splits a character.
        let bytes = s.as_bytes();
        let mut plain = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-25T22:00:00.123456Z`.
fn write_timestamp(out: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    write_padded(out, year.max(0) as u64, 4)?;
    out.write_char('-')?;
    write_padded(out, u64::from(month), 2)?;
    out.write_char('-')?;
    write_padded(out, u64::from(day), 2)?;
    out.write_char('T')?;
    write_padded(out, rem / 3600, 2)?;
    out.write_char(':')?;
    write_padded(out, rem % 3600 / 60, 2)?;
    out.write_char(':')?;
    write_padded(out, rem % 60, 2)?;
    out.write_char('.')?;
    write_padded(out, u64::from(since.subsec_micros()), 6)?;
    out.write_char('Z')
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let mut s = String::new();
        write_timestamp(&mut s, UNIX_EPOCH).expect("write");
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        s.clear();
        // 2024-02-29 (a leap day) 13:45:07.250001 UTC.
        let t = UNIX_EPOCH + Duration::new(1_709_214_307, 250_001_000);
        write_timestamp(&mut s, t).expect("write");
        assert_eq!(s, "2024-02-29T13:45:07.250001Z");
        s.clear();
        write_timestamp(&mut s, UNIX_EPOCH + Duration::from_secs(1_798_761_599)).expect("write");
        assert_eq!(s, "2026-12-31T23:59:59.000000Z");
    }

    #[test]
    fn numbers_are_plain_decimal() {
        for (value, width, expected) in [
            (0, 1, "0"),
            (7, 2, "07"),
            (42, 1, "42"),
            (2026, 4, "2026"),
            (5, 6, "000005"),
            (u64::MAX, 1, "18446744073709551615"),
        ] {
            let mut s = String::new();
            write_padded(&mut s, value, width).expect("write");
            assert_eq!(s, expected);
        }
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        write_str(&mut s, "a\"b\\c\nd\u{1}é").expect("write");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_event_is_one_json_object_with_its_fields_at_the_top() {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let addr: std::net::SocketAddr = "10.0.0.1:80".parse().expect("addr");
            tracing::info!(target: "access", n = 3u64, zero = 0u64, neg = -2i64, ok = true, no = false, text = "q\"uote", addr = %addr, dbg = ?Some(1), "http request");
        });
        let bytes = captured.0.lock().expect("lock").clone();
        let line = String::from_utf8(bytes).expect("utf-8");
        assert!(line.ends_with('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).expect("valid JSON");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "access");
        assert_eq!(v["message"], "http request");
        assert_eq!(v["n"], 3);
        assert_eq!(v["zero"], 0);
        assert_eq!(v["neg"], -2);
        assert_eq!(v["ok"], true);
        assert_eq!(v["no"], false);
        assert_eq!(v["text"], "q\"uote");
        assert_eq!(v["addr"], "10.0.0.1:80");
        assert_eq!(v["dbg"], "Some(1)");
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
