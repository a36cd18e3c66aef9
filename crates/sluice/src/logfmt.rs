//! The text log line, written with little work per event.
//!
//! With `log_connections` on, every login and logout writes a line, so under connection churn
//! formatting is a real share of Sluice's CPU. tracing-subscriber's default formatter spent
//! about 11,000 instructions per line here (styles for every field name, a calendar
//! conversion per timestamp); this one writes the same shape of line for a fraction of that:
//!
//! `2026-11-28T12:43:20.586377Z  INFO sluice_proxy::session: client connected client.id=7 user=app`
//!
//! Control characters in values (a user name with a newline, an escape sequence in an
//! application_name) are escaped, so a client cannot forge or colour log lines.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// `timestamp  LEVEL target: message key=value ...`, optionally with a coloured level.
pub struct LeanText {
    /// Colour the level (for a terminal).
    pub ansi: bool,
}

impl<S, N> FormatEvent<S, N> for LeanText
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write_timestamp(&mut w, SystemTime::now())?;
        let meta = event.metadata();
        w.write_str(level_text(meta.level(), self.ansi))?;
        w.write_char(' ')?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                w.write_str(span.name())?;
                w.write_char(':')?;
            }
            w.write_char(' ')?;
        }
        w.write_str(meta.target())?;
        w.write_str(":")?;
        let mut fields = Fields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_char('\n')
    }
}

fn level_text(level: &Level, ansi: bool) -> &'static str {
    match (*level, ansi) {
        (Level::ERROR, false) => " ERROR",
        (Level::WARN, false) => "  WARN",
        (Level::INFO, false) => "  INFO",
        (Level::DEBUG, false) => " DEBUG",
        (Level::TRACE, false) => " TRACE",
        (Level::ERROR, true) => " \x1b[31mERROR\x1b[0m",
        (Level::WARN, true) => "  \x1b[33mWARN\x1b[0m",
        (Level::INFO, true) => "  \x1b[32mINFO\x1b[0m",
        (Level::DEBUG, true) => " \x1b[34mDEBUG\x1b[0m",
        (Level::TRACE, true) => " \x1b[35mTRACE\x1b[0m",
    }
}

/// Writes `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC). The date and time up to the second are
/// formatted once per second and reused.
fn write_timestamp(w: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    thread_local! {
        static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let text = SECOND.with(|cached| {
        let (at, text) = cached.get();
        if at == secs {
            return text;
        }
        let text = civil_second(secs);
        cached.set((secs, text));
        text
    });
    // The cached bytes are ASCII digits and separators.
    w.write_str(std::str::from_utf8(&text).unwrap_or("????-??-??T??:??:??"))?;
    let micros = since.subsec_micros();
    let mut frac = *b".000000Z";
    let mut m = micros;
    for i in (1..7).rev() {
        frac[i] = b'0' + (m % 10) as u8;
        m /= 10;
    }
    w.write_str(std::str::from_utf8(&frac).unwrap_or(".??????Z"))
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the Unix epoch (proleptic Gregorian, UTC).
fn civil_second(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, v: u64, width: usize| {
        let mut v = v;
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, y.clamp(0, 9999) as u64, 4);
    put(5, m, 2);
    put(8, d, 2);
    put(11, rem / 3600, 2);
    put(14, rem / 60 % 60, 2);
    put(17, rem % 60, 2);
    out
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe as i64 + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Writes an event's fields: the message first as it is, then ` name=value` for the rest.
/// String values are written bare when they are one plain word, else quoted (logfmt style).
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn write(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.w.write_char(' ')?;
            if field.name() != "message" {
                self.w.write_str(field.name())?;
                self.w.write_char('=')?;
            }
            value(self.w)
        })();
    }
}

/// Whether a string can be written without quotes and still read back as one value.
fn is_bare(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b > b' ' && b != b'"' && b != b'=' && b != b'\\' && b != 0x7f)
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, |w| Escaped(w).write_str(value));
        } else if is_bare(value) {
            self.write(field, |w| w.write_str(value));
        } else {
            self.write(field, |w| write!(w, "{value:?}"));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, |w| write!(Escaped(w), "{value:?}"));
    }
}

/// Passes text through, escaping control characters (`\n`, ESC, ...) as `\u{..}`.
struct Escaped<W>(W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !s.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            if c.is_ascii_control() {
                write!(self.0, "\\u{{{:x}}}", c as u32)?;
            } else {
                self.0.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stamp(secs: u64, micros: u32) -> String {
        let mut s = String::new();
        let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into());
        write_timestamp(&mut s, t).unwrap();
        s
    }

    #[test]
    fn timestamps_are_utc_rfc3339_with_microseconds() {
        assert_eq!(stamp(0, 0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day in a century leap year) 23:59:59.
        assert_eq!(stamp(951_868_799, 7), "2000-02-29T23:59:59.000007Z");
        assert_eq!(stamp(1_795_869_000, 586_377), "2026-11-28T12:30:00.586377Z");
        // The cached second is not reused for a different second.
        assert_eq!(stamp(1_795_869_001, 0), "2026-11-28T12:30:01.000000Z");
        assert_eq!(stamp(4_107_542_400, 999_999), "2100-03-01T00:00:00.999999Z");
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut s = String::new();
        Escaped(&mut s).write_str("app\nFAKE \x1b[31mred").unwrap();
        assert_eq!(s, "app\\u{a}FAKE \\u{1b}[31mred");
    }

    #[test]
    fn a_line_has_the_usual_shape() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(LeanText { ansi: false })
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(client.id = 7u64, user = %"app", app = "pg bench", db = "x", ok = true, "client connected");
            tracing::warn!(app = %"a\nb", name = "a\"b", "odd name");
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let (ts, rest) = lines[0].split_at(27);
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        assert_eq!(
            rest,
            "  INFO sluice::logfmt::tests: client connected client.id=7 user=app app=\"pg bench\" db=x ok=true"
        );
        assert!(
            lines[1].ends_with(r#"  WARN sluice::logfmt::tests: odd name app=a\u{a}b name="a\"b""#),
            "{}",
            lines[1]
        );
    }
}
