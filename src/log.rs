//! Where log lines go and how they look.
//!
//! Everything logs through `tracing`. Lines are written to stderr in batches
//! ([`flush`] every 100 ms and on exit): a line per request must not cost a
//! system call per request. The access log (target `portico::access`, one
//! event per request) has its own layer that formats its fields straight
//! into a reused buffer, plain (`key=value`) or JSON; other events go through
//! `tracing-subscriber`'s formatter. `RUST_LOG` filters both
//! (`RUST_LOG=info,portico::access=off` turns the access log off).

use crate::cli::LogFormat;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer;

/// The access log's target.
pub const ACCESS: &str = "portico::access";

/// Log output buffered in memory and written to stderr in batches.
pub struct BufferedStderr {
    buf: Mutex<std::io::BufWriter<std::io::Stderr>>,
}

static OUTPUT: LazyLock<BufferedStderr> = LazyLock::new(|| BufferedStderr {
    buf: Mutex::new(std::io::BufWriter::with_capacity(
        64 * 1024,
        std::io::stderr(),
    )),
});

impl BufferedStderr {
    fn write_all(&self, data: &[u8]) {
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let _ = b.write_all(data);
    }
}

/// A handle that `tracing-subscriber` writes one event through.
pub struct LogGuard(&'static BufferedStderr);

impl std::io::Write for LogGuard {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for &'static BufferedStderr {
    type Writer = LogGuard;

    fn make_writer(&'a self) -> LogGuard {
        LogGuard(self)
    }
}

/// Writes out buffered log lines.
pub fn flush() {
    let mut b = OUTPUT.buf.lock().unwrap_or_else(|p| p.into_inner());
    let _ = b.flush();
}

/// Installs the subscriber: `RUST_LOG` (default `info`), the access layer,
/// and the formatter for everything else, plain or JSON.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let not_access = tracing_subscriber::filter::filter_fn(|m| m.target() != ACCESS);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(&*OUTPUT);
    let fmt = match format {
        LogFormat::Plain => fmt.with_filter(not_access).boxed(),
        LogFormat::Json => fmt.json().with_filter(not_access).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(AccessLayer {
            json: format == LogFormat::Json,
        })
        .try_init();
}

/// Formats access log events.
pub struct AccessLayer {
    pub json: bool,
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(256));
    /// The last whole second formatted, and its text.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl<S: tracing::Subscriber> Layer<S> for AccessLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != ACCESS {
            return;
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            format_access(&mut line, event, self.json, SystemTime::now());
            OUTPUT.write_all(line.as_bytes());
        });
    }
}

/// One access log line, newline included.
pub fn format_access(line: &mut String, event: &tracing::Event<'_>, json: bool, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            cached.1.clear();
            write_rfc3339_seconds(&mut cached.1, secs);
            cached.0 = secs;
        }
        if json {
            line.push_str("{\"ts\":\"");
        }
        line.push_str(&cached.1);
    });
    let _ = write!(line, ".{:03}Z", since.subsec_millis());
    if json {
        line.push_str("\",\"log\":\"access\"");
    } else {
        line.push_str(" access");
    }
    event.record(&mut AccessFields { line, json });
    if json {
        line.push('}');
    }
    line.push('\n');
}

struct AccessFields<'a> {
    line: &'a mut String,
    json: bool,
}

impl AccessFields<'_> {
    fn key(&mut self, field: &Field) {
        if self.json {
            let _ = write!(self.line, ",\"{}\":", field.name());
        } else {
            let _ = write!(self.line, " {}=", field.name());
        }
    }

    fn text(&mut self, field: &Field, value: &dyn std::fmt::Display) {
        self.key(field);
        if !self.json {
            let start = self.line.len();
            let _ = write!(self.line, "{value}");
            // A value a client wrote (a Host, say) must not be able to add
            // fields of its own: one with a space, `=`, a quote, a
            // backslash or a control character is written quoted, logfmt
            // style, and so is an empty one.
            let plain = &self.line[start..];
            if plain.is_empty()
                || plain
                    .bytes()
                    .any(|b| matches!(b, b' ' | b'=' | b'"' | b'\\') || b < 0x20 || b == 0x7f)
            {
                let raw = self.line.split_off(start);
                self.line.push('"');
                for c in raw.chars() {
                    match c {
                        '"' => self.line.push_str("\\\""),
                        '\\' => self.line.push_str("\\\\"),
                        c if (c as u32) < 0x20 || c == '\x7f' => {
                            let _ = write!(self.line, "\\x{:02x}", c as u32);
                        }
                        c => self.line.push(c),
                    }
                }
                self.line.push('"');
            }
            return;
        }
        self.line.push('"');
        let start = self.line.len();
        let _ = write!(self.line, "{value}");
        // JSON string escaping of what was just written.
        if self.line[start..]
            .bytes()
            .any(|b| b == b'"' || b == b'\\' || b < 0x20)
        {
            let raw = self.line.split_off(start);
            for c in raw.chars() {
                match c {
                    '"' => self.line.push_str("\\\""),
                    '\\' => self.line.push_str("\\\\"),
                    c if (c as u32) < 0x20 => {
                        let _ = write!(self.line, "\\u{:04x}", c as u32);
                    }
                    c => self.line.push(c),
                }
            }
        }
        self.line.push('"');
    }
}

impl Visit for AccessFields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.line, "{value}");
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.line, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        let _ = write!(self.line, "{value}");
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields arrive here; their Debug is their Display.
        self.text(field, &format_args!("{value:?}"));
    }
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) of a Unix time in seconds.
fn write_rfc3339_seconds(out: &mut String, secs: u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};
    use std::time::Duration;

    #[test]
    fn dates_are_rfc3339() {
        let cases = [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_795_392_000 + 3_661, "2026-11-23T01:01:01"),
            (4_102_444_799, "2099-12-31T23:59:59"),
        ];
        for (secs, want) in cases {
            let mut s = String::new();
            write_rfc3339_seconds(&mut s, secs);
            assert_eq!(s, want, "{secs}");
        }
    }

    /// Captures the lines the access format produces for events in `f`.
    fn lines(json: bool, f: impl FnOnce()) -> Vec<String> {
        struct Capture {
            json: bool,
            out: Arc<StdMutex<Vec<String>>>,
        }
        impl<S: tracing::Subscriber> Layer<S> for Capture {
            fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
                let mut line = String::new();
                let at = UNIX_EPOCH + Duration::from_millis(1_795_392_000_123);
                format_access(&mut line, event, self.json, at);
                self.out.lock().unwrap().push(line);
            }
        }
        let out = Arc::new(StdMutex::new(vec![]));
        let sub = tracing_subscriber::registry().with(Capture {
            json,
            out: out.clone(),
        });
        tracing::subscriber::with_default(sub, f);
        let v = out.lock().unwrap().clone();
        v
    }

    #[test]
    fn access_lines_plain_and_json() {
        let emit = || {
            tracing::info!(
                target: "portico::access",
                method = %"GET",
                path = %"/a\"b",
                status = 200u16,
                bytes = 5u64,
                complete = false,
                upstream_us = None::<u64>,
                cache = "hit",
            );
        };
        let plain = lines(false, emit);
        assert_eq!(
            plain,
            vec!["2026-11-23T00:00:00.123Z access method=GET path=\"/a\\\"b\" status=200 bytes=5 complete=false cache=hit\n"]
        );
        // What a client wrote cannot add fields to a plain line.
        let forged = lines(false, || {
            tracing::info!(
                target: "portico::access",
                host = %"evil status=200 cache=hit",
                path = %"/\x1b[2J\\",
                rule = %"",
                status = 400u16,
            );
        });
        assert_eq!(
            forged,
            vec!["2026-11-23T00:00:00.123Z access host=\"evil status=200 cache=hit\" path=\"/\\x1b[2J\\\\\" rule=\"\" status=400\n"]
        );
        let json = lines(true, emit);
        assert_eq!(
            json,
            vec!["{\"ts\":\"2026-11-23T00:00:00.123Z\",\"log\":\"access\",\"method\":\"GET\",\"path\":\"/a\\\"b\",\"status\":200,\"bytes\":5,\"complete\":false,\"cache\":\"hit\"}\n"]
        );
        let parsed: serde_json::Value = serde_json::from_str(json[0].trim()).unwrap();
        assert_eq!(parsed["path"], "/a\"b");
        assert_eq!(parsed["complete"], false);
    }
}
