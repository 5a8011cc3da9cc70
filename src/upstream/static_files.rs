//! A backend that serves files from a directory.
//!
//! Only GET and HEAD are allowed. Validators and conditional requests follow
//! RFC 9110 §8.8 and §13 (strong ETag from size and modification time,
//! Last-Modified, 412 for If-Match / If-Unmodified-Since, 304 for
//! If-None-Match / If-Modified-Since), byte ranges follow §14 (one range
//! gives 206, an unsatisfiable one 416, several are answered with the whole
//! file). Nothing outside the root is ever read: the path is percent-decoded
//! exactly once and refused when it holds `..`, NUL, a backslash or a
//! still-encoded sequence, and the opened file's real path (symlinks
//! resolved, as the kernel opened it) must lie inside the canonical root.
//! Each file is reached by one path only, the one rules see (no `//`, `%2F`
//! or `.` segments, no `/` after a file's name). File access goes through
//! the blocking pool, so the runtime's threads never block on the disk.
//!
//! The file (or range) is streamed in chunks of [`CHUNK`] bytes as the
//! client takes them: a request holds one chunk in memory, whatever the size
//! of the file, and a client that goes away stops the reading.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};

use super::config::StaticConfig;

/// How much of a file is read at a time.
pub const CHUNK: usize = 64 * 1024;

/// The body of a static response: the selected bytes of an open file, read
/// [`CHUNK`] at a time, or nothing.
#[derive(Debug)]
pub struct FileBody {
    file: Option<tokio::fs::File>,
    /// Bytes still to send.
    remaining: u64,
    buf: BytesMut,
}

impl FileBody {
    /// A body with no bytes (HEAD, 304, errors).
    pub fn empty() -> FileBody {
        FileBody {
            file: None,
            remaining: 0,
            buf: BytesMut::new(),
        }
    }

    /// The next `count` bytes of `file` (positioned where they start).
    fn new(file: tokio::fs::File, count: u64) -> FileBody {
        FileBody {
            file: Some(file),
            remaining: count,
            buf: BytesMut::new(),
        }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let Some(file) = this.file.as_mut().filter(|_| this.remaining > 0) else {
            this.file = None;
            return Poll::Ready(None);
        };
        let want = usize::try_from(this.remaining).map_or(CHUNK, |r| r.min(CHUNK));
        // Kept between polls: a pending read left nothing in it.
        this.buf.resize(want, 0);
        let mut read = ReadBuf::new(&mut this.buf[..]);
        match Pin::new(file).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                this.file = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    // The length was promised in the head already.
                    this.file = None;
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shrank while being read",
                    ))));
                }
                this.remaining -= n as u64;
                this.buf.truncate(n);
                Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// The methods a static-files backend answers, for `Allow`.
pub const METHODS: &str = "GET, HEAD, OPTIONS";

/// Answers `req` from the directory of `cfg`. The body streams the
/// selected bytes from the file (see the module doc).
pub async fn serve<B>(cfg: &StaticConfig, req: &Request<B>) -> Response<FileBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        // OPTIONS asks what the target supports (RFC 9110 §9.3.7): the same
        // methods for every path, so the answer needs no file. Anything else
        // (TRACE included) is refused with the list.
        let status = if req.method() == Method::OPTIONS {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::METHOD_NOT_ALLOWED
        };
        let mut resp = plain(status);
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(METHODS));
        return resp;
    }
    let segments = match decode_path(req.uri().path()) {
        Ok(s) => s,
        Err((status, reason)) => {
            tracing::debug!(path = req.uri().path(), reason, "static path refused");
            return plain(status);
        }
    };
    let Ok(root) = tokio::fs::canonicalize(&cfg.root).await else {
        tracing::warn!(root = %cfg.root.display(), "static root cannot be resolved");
        return plain(StatusCode::NOT_FOUND);
    };
    let mut target = root.clone();
    target.extend(&segments);
    let Some(mut found) = open_inside(&root, target).await else {
        return plain(StatusCode::NOT_FOUND);
    };
    if found.meta.is_dir() {
        if !req.uri().path().ends_with('/') {
            return redirect_to_directory(req);
        }
        match open_inside(&root, found.path.join(&cfg.index)).await {
            Some(index) if index.meta.is_file() => found = index,
            _ => return plain(StatusCode::NOT_FOUND),
        }
    } else if req.uri().path().ends_with('/') {
        // A file is no directory: `/a.txt/` names nothing (as on any file
        // system), so a rule on `/a.txt` cannot be side-stepped with it.
        return plain(StatusCode::NOT_FOUND);
    }
    serve_file(req, found).await
}

/// A file or directory opened inside the root.
struct Found {
    /// Where it really is: the path the kernel opened, symlinks resolved.
    path: PathBuf,
    file: std::fs::File,
    /// Of the open file, not of whatever the path names by now.
    meta: std::fs::Metadata,
}

/// Opens `path` and keeps it only when what was opened lies inside `root`
/// (itself canonical) and is a regular file or a directory. The check is on
/// the open file (its `/proc/self/fd` link and `fstat`), not on the path:
/// a directory on the way swapped for a symlink between a check and an open
/// cannot lead outside, and the length and validators sent are those of the
/// bytes sent. Opening does not block on a FIFO (`O_NONBLOCK`), which is then
/// refused like any other special file.
async fn open_inside(root: &Path, path: PathBuf) -> Option<Found> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::OpenOptionsExt as _;
        use std::os::unix::io::AsRawFd as _;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .ok()?;
        let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
        if !real.starts_with(&root) {
            tracing::warn!(path = %path.display(), "static path resolves outside the root");
            return None;
        }
        let meta = file.metadata().ok()?;
        (meta.is_file() || meta.is_dir()).then_some(Found {
            path: real,
            file,
            meta,
        })
    })
    .await
    .ok()
    .flatten()
}

async fn serve_file<B>(req: &Request<B>, found: Found) -> Response<FileBody> {
    let Found { path, file, meta } = found;
    let path = path.as_path();
    let meta = &meta;
    let len = meta.len();
    let modified = meta.modified().unwrap_or(UNIX_EPOCH);
    let since_epoch = modified
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let etag = format!("\"{:x}-{:x}\"", len, since_epoch.as_nanos());
    let last_modified = http_date(since_epoch.as_secs());
    let headers = req.headers();

    let mut validators = Vec::with_capacity(4);
    if let Ok(v) = HeaderValue::from_str(&etag) {
        validators.push((header::ETAG, v));
    }
    if let Ok(v) = HeaderValue::from_str(&last_modified) {
        validators.push((header::LAST_MODIFIED, v));
    }
    validators.push((header::ACCEPT_RANGES, HeaderValue::from_static("bytes")));

    // RFC 9110 §13.2.2: If-Match first, If-Unmodified-Since only when it
    // is absent; a failed one is 412 and nothing is sent.
    let precondition_failed = match headers.get(header::IF_MATCH) {
        Some(im) => !im.to_str().is_ok_and(|v| match_hits(v, &etag)),
        None => headers
            .get(header::IF_UNMODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_http_date)
            .is_some_and(|since| since_epoch.as_secs() > since),
    };
    if precondition_failed {
        return with_headers(plain(StatusCode::PRECONDITION_FAILED), validators);
    }
    // Then If-None-Match; If-Modified-Since only when it is absent.
    let not_modified = match headers.get(header::IF_NONE_MATCH) {
        Some(inm) => inm.to_str().is_ok_and(|v| none_match_hits(v, &etag)),
        None => headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_http_date)
            .is_some_and(|since| since_epoch.as_secs() <= since),
    };
    if not_modified {
        return with_headers(plain(StatusCode::NOT_MODIFIED), validators);
    }

    let mut status = StatusCode::OK;
    let mut start = 0;
    let mut count = len;
    // A Last-Modified date is a strong validator only when the file is a
    // second older than now (RFC 9110 §8.8.2.2): two writes within one
    // second would otherwise splice ranges of both.
    let date_is_strong = std::time::SystemTime::now()
        .duration_since(modified)
        .is_ok_and(|age| age >= Duration::from_secs(1));
    let range_applies = req.method() == Method::GET
        && headers.get(header::IF_RANGE).is_none_or(|v| {
            v.to_str().is_ok_and(|v| {
                v == etag || (date_is_strong && !v.starts_with('"') && v == last_modified)
            })
        });
    if range_applies {
        if let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            match parse_range(range, len) {
                RangeOutcome::Ignore => {}
                RangeOutcome::Unsatisfiable => {
                    let mut resp = plain(StatusCode::RANGE_NOT_SATISFIABLE);
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                        resp.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return with_headers(resp, validators);
                }
                RangeOutcome::Single(first, last) => {
                    status = StatusCode::PARTIAL_CONTENT;
                    start = first;
                    count = last - first + 1;
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")) {
                        validators.push((header::CONTENT_RANGE, v));
                    }
                }
            }
        }
    }

    let body = if req.method() == Method::HEAD {
        FileBody::empty()
    } else {
        match positioned(file, start).await {
            Ok(file) => FileBody::new(file, count),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "static file read failed");
                return plain(StatusCode::INTERNAL_SERVER_ERROR);
            }
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    with_headers(resp, validators)
}

/// The open file, positioned at `start`. A read that then fails (or finds
/// the file shorter than its length was) ends the body with an error, after
/// the head: the client sees a body cut short, never wrong bytes.
async fn positioned(file: std::fs::File, start: u64) -> std::io::Result<tokio::fs::File> {
    let mut file = tokio::fs::File::from_std(file);
    if start > 0 {
        file.seek(SeekFrom::Start(start)).await?;
    }
    Ok(file)
}

fn plain(status: StatusCode) -> Response<FileBody> {
    let mut resp = Response::new(FileBody::empty());
    *resp.status_mut() = status;
    resp
}

fn with_headers(
    mut resp: Response<FileBody>,
    headers: Vec<(HeaderName, HeaderValue)>,
) -> Response<FileBody> {
    for (k, v) in headers {
        resp.headers_mut().insert(k, v);
    }
    resp
}

/// Redirects a directory's path to the same with a final `/`. The path
/// starts with exactly one `/`: `//host/...` (or `/\host`) in `Location`
/// would send the client to another host.
fn redirect_to_directory<B>(req: &Request<B>) -> Response<FileBody> {
    let path = req.uri().path().trim_start_matches(['/', '\\']);
    let location = match req.uri().query() {
        Some(q) => format!("/{path}/?{q}"),
        None => format!("/{path}/"),
    };
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            let mut resp = plain(StatusCode::MOVED_PERMANENTLY);
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => plain(StatusCode::NOT_FOUND),
    }
}

/// Decodes a request path once into safe segments, or says why it is refused
/// and with what status.
///
/// Each file has one path: the one the rules see. A path that would reach a
/// file another way than its rules expect is refused with 404: an encoded
/// `/` (`/private%2Fkey`), an empty segment (`//private/key`, `/a//b`) or a
/// `.` segment; so a rule such as `deny when path ^= "/private/"` cannot be
/// side-stepped. The path's final `/` (a directory's) is the one empty
/// segment allowed.
fn decode_path(path: &str) -> Result<Vec<String>, (StatusCode, &'static str)> {
    let bad = |reason| (StatusCode::BAD_REQUEST, reason);
    let none = |reason| (StatusCode::NOT_FOUND, reason);
    let raw = path.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw
                .get(i + 1..i + 3)
                .ok_or(bad("truncated percent-encoding"))?;
            let hi = hex_value(hex[0]).ok_or(bad("bad percent-encoding"))?;
            let lo = hex_value(hex[1]).ok_or(bad("bad percent-encoding"))?;
            let byte = hi << 4 | lo;
            if byte == b'/' {
                return Err(none("encoded slash"));
            }
            bytes.push(byte);
            i += 3;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(bytes).map_err(|_| bad("path is not UTF-8"))?;
    if decoded.contains('\0') {
        return Err(bad("NUL in path"));
    }
    if decoded.contains('\\') {
        return Err(bad("backslash in path"));
    }
    let d = decoded.as_bytes();
    if d.windows(3)
        .any(|w| w[0] == b'%' && hex_value(w[1]).is_some() && hex_value(w[2]).is_some())
    {
        return Err(bad("encoded sequence left after decoding"));
    }
    let Some(rest) = decoded.strip_prefix('/') else {
        return Err(bad("path does not start with /"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut segments = Vec::new();
    if rest.is_empty() {
        return Ok(segments);
    }
    for seg in rest.split('/') {
        match seg {
            "" => return Err(none("empty segment")),
            "." => return Err(none("dot segment")),
            ".." => return Err(bad("parent segment")),
            s => segments.push(s.to_owned()),
        }
    }
    Ok(segments)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `true` when an If-Match value matches `etag` by strong comparison
/// (RFC 9110 §13.1.1, §8.8.3.2): a weak tag never does.
fn match_hits(value: &str, etag: &str) -> bool {
    value.trim() == "*" || value.split(',').any(|t| t.trim() == etag)
}

/// `true` when an If-None-Match value matches `etag` by weak comparison
/// (RFC 9110 §13.1.2, §8.8.3.2).
fn none_match_hits(value: &str, etag: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    value.trim() == "*" || value.split(',').any(|t| strip(t) == strip(etag))
}

#[derive(Debug, PartialEq, Eq)]
enum RangeOutcome {
    /// Serve the whole file (no usable range, or several ranges).
    Ignore,
    /// No byte of the file is in the range: 416.
    Unsatisfiable,
    /// First and last byte, inclusive.
    Single(u64, u64),
}

/// Parses a `Range` value (RFC 9110 §14.1.2) against a file of `len` bytes.
fn parse_range(value: &str, len: u64) -> RangeOutcome {
    let value = value.trim();
    // The unit is case-insensitive.
    let Some(spec) = value
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| &value[6..])
    else {
        return RangeOutcome::Ignore;
    };
    if spec.contains(',') {
        return RangeOutcome::Ignore;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeOutcome::Ignore;
    };
    // A number too large for u64 is larger than any file: it stands for
    // u64::MAX, so that a last byte past the end is clamped (§14.1.1).
    let parse = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            Some(s.parse().unwrap_or(u64::MAX))
        }
    };
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeOutcome::Unsatisfiable,
            Some(n) if len > 0 => RangeOutcome::Single(len.saturating_sub(n), len - 1),
            // An empty file has no last bytes to send: the whole (empty)
            // file answers, as this is the one satisfiable form for it.
            Some(_) => RangeOutcome::Ignore,
            None => RangeOutcome::Ignore,
        },
        // bytes=A-: from A to the end.
        (false, true) => match parse(first) {
            Some(a) if a < len => RangeOutcome::Single(a, len - 1),
            Some(_) => RangeOutcome::Unsatisfiable,
            None => RangeOutcome::Ignore,
        },
        (false, false) => match (parse(first), parse(last)) {
            (Some(a), Some(b)) if a > b => RangeOutcome::Ignore,
            (Some(a), Some(_)) if a >= len => RangeOutcome::Unsatisfiable,
            (Some(a), Some(b)) => RangeOutcome::Single(a, b.min(len - 1)),
            _ => RangeOutcome::Ignore,
        },
        (true, true) => RangeOutcome::Ignore,
    }
}

/// Media type by file extension; unknown types are `application/octet-stream`.
fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        _ => "application/octet-stream",
    }
}

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Formats seconds since the epoch as an IMF-fixdate (RFC 9110 §5.6.7).
pub(crate) fn http_date(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses an IMF-fixdate into seconds since the epoch. The obsolete formats
/// are not accepted; an unparsable date makes the condition ignored, as
/// RFC 9110 §13.1.3 requires.
fn parse_http_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 29 || &s[25..] != " GMT" || b[3] != b',' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let day = num(5..7)?;
    let month = MONTHS.iter().position(|m| Some(*m) == s.get(8..11))? as u64 + 1;
    let year = num(12..16)?;
    let (h, mi, se) = (num(17..19)?, num(20..22)?, num(23..25)?);
    if !(1..=31).contains(&day) || h > 23 || mi > 59 || se > 60 || year < 1970 {
        return None;
    }
    let days = days_from_civil(year as i64, month as i64, day as i64);
    Some(days as u64 * 86_400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    struct Site {
        dir: tempfile::TempDir,
        cfg: StaticConfig,
    }

    fn site() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir_all(root.join("docs")).unwrap();
        std::fs::write(root.join("hello.txt"), b"hello, world").unwrap();
        std::fs::write(root.join("index.html"), b"<h1>home</h1>").unwrap();
        std::fs::write(root.join("docs/index.html"), b"docs").unwrap();
        std::fs::write(root.join("app.js"), b"1").unwrap();
        std::fs::write(dir.path().join("secret.txt"), b"top secret").unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/index.html"), b"top secret").unwrap();
        let cfg = StaticConfig::new(&root);
        Site { dir, cfg }
    }

    async fn get(
        site: &Site,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = serve(&site.cfg, &req.body(()).unwrap()).await;
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    #[tokio::test]
    async fn serves_files_with_type_length_and_validators() {
        let s = site();
        let (st, h, body) = get(&s, Method::GET, "/hello.txt", &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(&body[..], b"hello, world");
        assert_eq!(h[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(h[header::CONTENT_LENGTH], "12");
        assert!(h.contains_key(header::ETAG));
        assert!(h.contains_key(header::LAST_MODIFIED));
        let (_, h, _) = get(&s, Method::GET, "/app.js", &[]).await;
        assert_eq!(h[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
    }

    #[tokio::test]
    async fn head_has_headers_but_no_body() {
        let s = site();
        let (st, h, body) = get(&s, Method::HEAD, "/hello.txt", &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(h[header::CONTENT_LENGTH], "12");
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn other_methods_get_405_with_allow() {
        let s = site();
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::TRACE] {
            let (st, h, _) = get(&s, m, "/hello.txt", &[]).await;
            assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(h[header::ALLOW], "GET, HEAD, OPTIONS");
        }
    }

    #[tokio::test]
    async fn options_lists_the_methods_for_any_path() {
        let s = site();
        for path in ["/hello.txt", "/nope.txt", "*"] {
            let (st, h, body) = get(&s, Method::OPTIONS, path, &[]).await;
            assert_eq!(st, StatusCode::NO_CONTENT, "{path}");
            assert_eq!(h[header::ALLOW], "GET, HEAD, OPTIONS");
            assert!(body.is_empty());
        }
    }

    #[tokio::test]
    async fn missing_is_404_and_directories_use_index() {
        let s = site();
        assert_eq!(
            get(&s, Method::GET, "/nope.txt", &[]).await.0,
            StatusCode::NOT_FOUND
        );
        let (st, _, body) = get(&s, Method::GET, "/", &[]).await;
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"<h1>home</h1>"[..]));
        let (st, h, _) = get(&s, Method::GET, "/docs?x=1", &[]).await;
        assert_eq!(st, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(h[header::LOCATION], "/docs/?x=1");
        // No second path to a directory: and `//docs/` in a Location would
        // name a host called `docs`.
        for path in ["//docs", "///docs?x=1"] {
            let (st, h, _) = get(&s, Method::GET, path, &[]).await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{path}");
            assert!(h.get(header::LOCATION).is_none(), "{path}");
        }
        let (st, _, body) = get(&s, Method::GET, "/docs/", &[]).await;
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"docs"[..]));
        let (st, _, body) = get(&s, Method::GET, "/hello%2etxt", &[]).await;
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"hello, world"[..]));
    }

    #[tokio::test]
    async fn conditional_requests_answer_304() {
        let s = site();
        let (_, h, _) = get(&s, Method::GET, "/hello.txt", &[]).await;
        let etag = h[header::ETAG].to_str().unwrap().to_owned();
        let lm = h[header::LAST_MODIFIED].to_str().unwrap().to_owned();
        let weak = format!("W/{etag}");
        let list = format!("\"other\", {etag}");
        let table: &[(&[(&str, &str)], StatusCode)] = &[
            (&[("if-none-match", &etag)], StatusCode::NOT_MODIFIED),
            (&[("if-none-match", &weak)], StatusCode::NOT_MODIFIED),
            (&[("if-none-match", &list)], StatusCode::NOT_MODIFIED),
            (&[("if-none-match", "*")], StatusCode::NOT_MODIFIED),
            (&[("if-none-match", "\"other\"")], StatusCode::OK),
            (&[("if-modified-since", &lm)], StatusCode::NOT_MODIFIED),
            (
                &[("if-modified-since", "Thu, 01 Jan 1970 00:00:00 GMT")],
                StatusCode::OK,
            ),
            (&[("if-modified-since", "garbage")], StatusCode::OK),
            // If-None-Match wins over If-Modified-Since.
            (
                &[("if-none-match", "\"other\""), ("if-modified-since", &lm)],
                StatusCode::OK,
            ),
        ];
        for (headers, want) in table {
            let (st, h, body) = get(&s, Method::GET, "/hello.txt", headers).await;
            assert_eq!(st, *want, "{headers:?}");
            if st == StatusCode::NOT_MODIFIED {
                assert!(body.is_empty());
                assert_eq!(h[header::ETAG], etag.as_str());
            }
        }
    }

    #[tokio::test]
    async fn single_ranges_206_and_unsatisfiable_416() {
        let s = site();
        let table: &[(&str, StatusCode, &str, Option<&str>)] = &[
            (
                "bytes=0-4",
                StatusCode::PARTIAL_CONTENT,
                "hello",
                Some("bytes 0-4/12"),
            ),
            (
                "bytes=7-",
                StatusCode::PARTIAL_CONTENT,
                "world",
                Some("bytes 7-11/12"),
            ),
            (
                "bytes=-5",
                StatusCode::PARTIAL_CONTENT,
                "world",
                Some("bytes 7-11/12"),
            ),
            (
                "bytes=7-100",
                StatusCode::PARTIAL_CONTENT,
                "world",
                Some("bytes 7-11/12"),
            ),
            (
                "bytes=12-",
                StatusCode::RANGE_NOT_SATISFIABLE,
                "",
                Some("bytes */12"),
            ),
            (
                "bytes=-0",
                StatusCode::RANGE_NOT_SATISFIABLE,
                "",
                Some("bytes */12"),
            ),
            ("bytes=0-1,3-4", StatusCode::OK, "hello, world", None),
            ("bytes=5-2", StatusCode::OK, "hello, world", None),
            ("items=0-1", StatusCode::OK, "hello, world", None),
        ];
        for (range, status, body_want, content_range) in table {
            let (st, h, body) = get(&s, Method::GET, "/hello.txt", &[("range", range)]).await;
            assert_eq!(st, *status, "{range}");
            assert_eq!(&body[..], body_want.as_bytes(), "{range}");
            assert_eq!(
                h.get(header::CONTENT_RANGE).map(|v| v.to_str().unwrap()),
                *content_range,
                "{range}"
            );
        }
        let (st, _, _) = get(
            &s,
            Method::GET,
            "/hello.txt",
            &[("range", "bytes=0-1"), ("if-range", "\"stale\"")],
        )
        .await;
        assert_eq!(st, StatusCode::OK, "a stale If-Range gets the whole file");
    }

    #[tokio::test]
    async fn no_path_escapes_the_root() {
        let s = site();
        let root = s.cfg.root.clone();
        std::os::unix::fs::symlink(s.dir.path().join("secret.txt"), root.join("leak.txt")).unwrap();
        std::os::unix::fs::symlink(s.dir.path().join("outside"), root.join("leakdir")).unwrap();
        std::os::unix::fs::symlink(root.join("hello.txt"), root.join("inside.txt")).unwrap();
        let escapes = [
            "/../secret.txt",
            "/docs/../../secret.txt",
            "/%2e%2e/secret.txt",
            "/%2E%2E/secret.txt",
            "/%252e%252e/secret.txt",
            "/..%2fsecret.txt",
            "/..%5csecret.txt",
            "/%5c..%5csecret.txt",
            "/hello.txt%00.html",
            "/%c0%ae%c0%ae/secret.txt",
            "/leak.txt",
            "/leakdir/",
            "/leakdir/index.html",
            "//etc/passwd",
            "/%2fetc%2fpasswd",
        ];
        for path in escapes {
            let (st, _, body) = get(&s, Method::GET, path, &[]).await;
            assert!(
                st == StatusCode::BAD_REQUEST || st == StatusCode::NOT_FOUND,
                "{path}: {st}"
            );
            assert!(!body.windows(6).any(|w| w == b"secret"), "{path} leaked");
        }
        // A symlink that stays inside the root is fine.
        let (st, _, body) = get(&s, Method::GET, "/inside.txt", &[]).await;
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"hello, world"[..]));
    }

    #[test]
    fn http_dates_round_trip() {
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        for secs in [0u64, 951_782_400, 1_700_000_000, 4_102_444_800] {
            assert_eq!(parse_http_date(&http_date(secs)), Some(secs));
        }
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
    }
}
