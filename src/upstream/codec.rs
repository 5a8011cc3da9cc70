//! HTTP/1.1 on the wire to a backend (RFC 9112): the request head Portico
//! writes, the response head it reads, and the framing of both bodies.
//!
//! Pure functions over byte buffers; the connection that moves the bytes is
//! [`super::conn`]. Parsing is httparse's; what is Portico's own is the
//! framing rules of RFC 9112 §6 and the chunked coding of §7.1, and writing
//! response fields as slices of the read buffer rather than copies.

use std::io::Write as _;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// Most fields a response head may carry (as many as hyper allows, and some).
pub(super) const MAX_FIELDS: usize = 128;
/// Largest response head, and largest trailer section, accepted.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most interim (1xx) heads taken before a final one.
pub(super) const MAX_INTERIM: u32 = 32;
/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// What is wrong with the bytes a backend sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The response head does not parse.
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    /// The response head is larger than 64 KiB.
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// A field name or value that `http` does not accept.
    #[error("invalid response field")]
    Field,
    /// Content-Length that is not one non-negative integer (RFC 9112 §6.3).
    #[error("invalid Content-Length")]
    ContentLength,
    /// Transfer-Encoding that is not one `chunked` (RFC 9112 §6.1): a
    /// coding Portico does not decode, chunked more than once, or no
    /// coding at all. See [`check_transfer_codings`].
    #[error("unsupported Transfer-Encoding: {0}")]
    TransferCoding(&'static str),
    /// More interim (1xx) heads before the final one than anyone sends.
    #[error("more than {MAX_INTERIM} interim responses")]
    TooManyInterim,
    /// A 101 answer to a request that asked for no upgrade.
    #[error("101 Switching Protocols without an upgrade request")]
    UnexpectedUpgrade,
    /// A chunk-size line that is not hexadecimal digits and extensions.
    #[error("invalid chunk size")]
    ChunkSize,
    /// Chunk data not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    /// A trailer section that does not parse or is too large.
    #[error("invalid trailer section")]
    Trailers,
    /// The connection closed before the body's end.
    #[error("the connection closed before the response body ended")]
    Incomplete,
    /// A request body that is not as long as its Content-Length says.
    #[error("request body length differs from its Content-Length")]
    RequestLength,
}

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestFraming {
    /// No body, and no framing field.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// The framing of a request body: none when it is empty and its method
/// gives a body no meaning, its length when known, chunked otherwise. An
/// empty body of a method that defines one (POST, PUT, PATCH) says
/// `Content-Length: 0` (RFC 9110 §8.6).
pub(super) fn request_framing(method: &Method, empty: bool, exact: Option<u64>) -> RequestFraming {
    if empty || exact == Some(0) {
        return if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            RequestFraming::Length(0)
        } else {
            RequestFraming::None
        };
    }
    match exact {
        Some(n) => RequestFraming::Length(n),
        None => RequestFraming::Chunked,
    }
}

/// Appends a request head to `out`: the request line in origin-form, every
/// field but the framing ones (which come from `framing`, whatever the
/// client sent), the field lines of `extra` as they are, and the empty line.
pub(super) fn encode_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    fields: &HeaderMap,
    extra: &[u8],
    framing: RequestFraming,
) {
    out.reserve(64 + target.len() + fields.len() * 32 + extra.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in fields {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(extra);
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes request body data under its framing and checks its length.
#[derive(Debug)]
pub(super) struct BodyEncoder {
    framing: RequestFraming,
    /// Bytes still owed under `Content-Length`.
    owed: u64,
}

impl BodyEncoder {
    pub(super) fn new(framing: RequestFraming) -> Self {
        let owed = match framing {
            RequestFraming::Length(n) => n,
            _ => 0,
        };
        Self { framing, owed }
    }

    /// Appends `data` to `out`, framed.
    pub(super) fn data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        if data.is_empty() {
            return Ok(());
        }
        match self.framing {
            RequestFraming::None => return Err(ProtocolError::RequestLength),
            RequestFraming::Length(_) => {
                let len = data.len() as u64;
                if len > self.owed {
                    return Err(ProtocolError::RequestLength);
                }
                self.owed -= len;
                out.extend_from_slice(data);
            }
            RequestFraming::Chunked => {
                // No allocation: writing to a Vec cannot fail.
                let _ = write!(out, "{:x}\r\n", data.len());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }

    /// Appends the end of the body to `out`; fails if a length was promised
    /// and not met.
    pub(super) fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        match self.framing {
            RequestFraming::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
            RequestFraming::Length(_) if self.owed > 0 => return Err(ProtocolError::RequestLength),
            _ => {}
        }
        Ok(())
    }
}

/// A parsed final response head.
#[derive(Debug)]
pub(super) struct ResponseHead {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) fields: HeaderMap,
    /// How its body is delimited.
    pub(super) body: Decoder,
    /// Whether the connection may carry another request after this
    /// response's body (RFC 9112 §9.3).
    pub(super) keep_alive: bool,
}

/// What [`parse_response_head`] found at the start of the buffer.
#[derive(Debug)]
pub(super) enum Parsed {
    /// More bytes are needed.
    Partial,
    /// An interim (1xx) response, taken from the buffer and dropped.
    Interim,
    /// The final response head, taken from the buffer.
    Final(Box<ResponseHead>),
}

/// Parses the response head at the start of `buf`, taking its bytes when it
/// is complete. Field values are slices of the head's bytes, not copies.
/// `head_request` says whether the request was HEAD (no body follows).
pub(super) fn parse_response_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Parsed, ProtocolError> {
    parse_response_head_with(buf, head_request, &mut FieldNames::default())
}

/// [`parse_response_head`], taking field names from `names` when they are
/// the ones the connection's previous head had at the same places.
pub(super) fn parse_response_head_with(
    buf: &mut BytesMut,
    head_request: bool,
    names: &mut FieldNames,
) -> Result<Parsed, ProtocolError> {
    // Where each field's name and value lie in the head, as offsets, so the
    // values can be sliced out once the head is frozen.
    // Left uninitialised like httparse's slots: only the first `count` are
    // written and read.
    let mut spans = [const { std::mem::MaybeUninit::<[u32; 4]>::uninit() }; MAX_FIELDS];
    let (len, code, version, count, seen) = {
        // Left uninitialised: httparse writes only the fields it finds, and
        // a full array would be 4 KiB of writes per response.
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_FIELDS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(ProtocolError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(e) => return Err(ProtocolError::Head(e)),
        };
        if len > MAX_HEAD_BYTES {
            return Err(ProtocolError::HeadTooLarge);
        }
        let base = buf.as_ptr() as usize;
        let count = response.headers.len();
        let mut seen = Seen::default();
        for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
            seen.note(field.name.as_bytes());
            // Offsets within a head of at most MAX_HEAD_BYTES fit in u32.
            let name = field.name.as_ptr() as usize - base;
            let value = field.value.as_ptr() as usize - base;
            span.write([
                name as u32,
                field.name.len() as u32,
                value as u32,
                field.value.len() as u32,
            ]);
        }
        let code = response.code.unwrap_or(0);
        let version = if response.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        (len, code, version, count, seen)
    };
    let status =
        StatusCode::from_u16(code).map_err(|_| ProtocolError::Head(httparse::Error::Status))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProtocolError::UnexpectedUpgrade);
    }
    let head = buf.split_to(len).freeze();
    if status.is_informational() {
        return Ok(Parsed::Interim);
    }
    let mut fields = HeaderMap::with_capacity(count);
    let mut seen = seen;
    for (at, span) in spans[..count].iter().enumerate() {
        // SAFETY: the loop above wrote the first `count` spans.
        let [name_at, name_len, value_at, value_len] = unsafe { span.assume_init() };
        let name = &head[name_at as usize..(name_at + name_len) as usize];
        let value_range = value_at as usize..(value_at + value_len) as usize;
        if seen.content_length && name.eq_ignore_ascii_case(b"content-length") {
            add_length(&head[value_range.clone()], &mut seen.length)?;
        }
        let name = names.name(at, name).ok_or(ProtocolError::Field)?;
        fields.append(name, parsed_value(head.slice(value_range)));
    }
    let (body, mut keep_alive) =
        response_framing(status, version, head_request, seen, &mut fields)?;
    keep_alive &= if seen.connection {
        connection_persists(version, &fields)
    } else {
        version == Version::HTTP_11
    };
    Ok(Parsed::Final(Box::new(ResponseHead {
        status,
        version,
        fields,
        body,
        keep_alive,
    })))
}

/// The framing of a response body (RFC 9112 §6.3), and false when the
/// framing itself forbids reusing the connection afterwards. A response
/// with both Transfer-Encoding and Content-Length loses the latter, which
/// it must not have sent (§6.1), so it cannot reach the client; so does
/// an HTTP/1.0 one with Transfer-Encoding, whose framing is suspect (§6.1).
/// Transfer-Encoding must be one `chunked` ([`check_transfer_codings`]).
fn response_framing(
    status: StatusCode,
    version: Version,
    head_request: bool,
    seen: Seen,
    fields: &mut HeaderMap,
) -> Result<(Decoder, bool), ProtocolError> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Decoder::Done, true));
    }
    if seen.transfer_encoding {
        check_transfer_codings(fields)?;
        let both = fields.remove(CONTENT_LENGTH).is_some();
        let suspect = both || version == Version::HTTP_10;
        return Ok((Decoder::Chunked(Chunk::Size), !suspect));
    }
    if seen.content_length {
        return Ok(match seen.length {
            Some(0) => (Decoder::Done, true),
            Some(n) => (Decoder::Length(n), true),
            None => return Err(ProtocolError::ContentLength),
        });
    }
    Ok((Decoder::Close, false))
}

/// Refuses a response whose Transfer-Encoding fields are anything but one
/// `chunked` (empty list elements aside, RFC 9110 §5.6.1).
///
/// Portico decodes chunked alone, and says so: its requests carry no `TE`
/// (a hop-by-hop field it removes), which tells the server it accepts no
/// transfer coding besides chunked (RFC 9110 §10.1.4, RFC 9112 §7.4). A
/// server that applies another anyway (`gzip, chunked`, or `gzip` ended by
/// closing the connection, RFC 9112 §6.1) is broken, and so is one that
/// chunks twice (`chunked, chunked`, which RFC 9112 §7 forbids) or names
/// no coding. Such a response is refused, answered 502 and its connection
/// dropped, rather than decoded: a transfer coding is this hop's framing,
/// which the client cannot be told of (Transfer-Encoding stops here), and
/// delivering the coded bytes, or storing them, would give every client a
/// body it cannot read as the resource; nor may the bytes be relabelled as
/// a content coding, which would change the representation that ETags,
/// ranges and cache variants describe. Decoding gzip or deflate here would
/// put an inflater, and its exposure to decompression bombs, on the path
/// of every response for the sake of servers that do not follow the
/// protocol.
pub(super) fn check_transfer_codings(fields: &HeaderMap) -> Result<(), ProtocolError> {
    let mut chunked = 0;
    for value in fields.get_all(TRANSFER_ENCODING) {
        for coding in value.as_bytes().split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            // Chunked has no parameters: `chunked;x=1` is some other coding.
            if !coding.eq_ignore_ascii_case(b"chunked") {
                return Err(ProtocolError::TransferCoding("a coding other than chunked"));
            }
            chunked += 1;
        }
    }
    match chunked {
        1 => Ok(()),
        0 => Err(ProtocolError::TransferCoding("no coding")),
        _ => Err(ProtocolError::TransferCoding("chunked more than once")),
    }
}

/// The field names of a connection's last head, by position: a peer sends
/// the same names in the same order head after head, and a name found
/// where it was last time is taken without being parsed and validated
/// again (a comparison instead of `HeaderName::from_bytes`).
#[derive(Debug, Default)]
pub(crate) struct FieldNames {
    names: Vec<(Box<[u8]>, HeaderName)>,
}

/// Most names remembered per connection.
const REMEMBERED_NAMES: usize = 24;

impl FieldNames {
    /// The name `raw`, the `at`-th field of a head; None when it is not a
    /// valid field name.
    pub(crate) fn name(&mut self, at: usize, raw: &[u8]) -> Option<HeaderName> {
        if let Some((seen, name)) = self.names.get(at) {
            if **seen == *raw {
                return Some(name.clone());
            }
        }
        let name = HeaderName::from_bytes(raw).ok()?;
        if at < self.names.len() {
            self.names[at] = (raw.into(), name.clone());
        } else if at == self.names.len() && at < REMEMBERED_NAMES {
            self.names.push((raw.into(), name.clone()));
        }
        Some(name)
    }
}

/// A field value as httparse gave it, not checked again byte by byte:
/// httparse takes in a value only HTAB, 0x20 to 0x7E and obs-text (0x80 to
/// 0xFF), and `HeaderValue` allows every one of them (and more: it refuses
/// only controls other than HTAB, and DEL). A property test below holds
/// httparse to this. Debug builds check anyway.
pub(crate) fn parsed_value(value: Bytes) -> HeaderValue {
    // SAFETY: `HeaderValue` requires no control byte but HTAB and no DEL;
    // httparse refuses both in values (see above), and the default
    // configuration used here keeps obs-fold (CR LF in a value) out.
    unsafe { HeaderValue::from_maybe_shared_unchecked(value) }
}

/// Whether a `Host` field value is `uri-host [ ":" port ]` (RFC 9110 §7.2):
/// a non-empty host of URI characters, no user information, digits alone
/// after its colon. A client's `Host` is held to it, and so is the one a
/// policy names for health probes.
pub(crate) fn valid_host_field(value: &[u8]) -> bool {
    /// The bytes of a reg-name (RFC 3986 section 3.2.2): unreserved,
    /// sub-delims, and `%` of percent-encoding; one lookup per byte.
    static REG_NAME: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            table[b] = (b as u8).is_ascii_alphanumeric();
            b += 1;
        }
        let extra = b"-._~%!$&'()*+,;=";
        let mut i = 0;
        while i < extra.len() {
            table[extra[i] as usize] = true;
            i += 1;
        }
        table
    };
    // RFC 3986 section 3.2.2: an IP literal in brackets, or a reg-name
    // (unreserved, percent-encoded, sub-delims), which covers IPv4.
    let host_end = match value.first() {
        Some(b'[') => match value.iter().position(|&b| b == b']') {
            Some(end) => {
                let inside = &value[1..end];
                if inside.is_empty()
                    || !inside
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                {
                    return false;
                }
                end + 1
            }
            None => return false,
        },
        _ => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            if !value[..end].iter().all(|&b| REG_NAME[usize::from(b)]) {
                return false;
            }
            end
        }
    };
    if host_end == 0 {
        return false;
    }
    match value.get(host_end..) {
        Some([]) | None => true,
        Some([b':', port @ ..]) => port.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// One Content-Length field value, a list of equal lengths or one
/// (RFC 9110 §8.6), folded into what earlier fields said: they must agree.
fn add_length(value: &[u8], length: &mut Option<u64>) -> Result<(), ProtocolError> {
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(ProtocolError::ContentLength);
        }
        // `1*DIGIT`: leading zeros are allowed, however many; what is left
        // must fit (any 19 digits do).
        let part = &part[part.iter().take_while(|&&d| d == b'0').count()..];
        if part.len() > 19 {
            return Err(ProtocolError::ContentLength);
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err(ProtocolError::ContentLength);
        }
        *length = Some(n);
    }
    Ok(())
}

/// Which framing fields a head carries, noted while it is parsed, so that
/// a response without them (most) costs no lookup for them; and the
/// length its Content-Length fields give.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    transfer_encoding: bool,
    content_length: bool,
    connection: bool,
    length: Option<u64>,
}

impl Seen {
    fn note(&mut self, name: &[u8]) {
        match name.len() {
            17 => self.transfer_encoding |= name.eq_ignore_ascii_case(b"transfer-encoding"),
            14 => self.content_length |= name.eq_ignore_ascii_case(b"content-length"),
            10 => self.connection |= name.eq_ignore_ascii_case(b"connection"),
            _ => {}
        }
    }
}

/// Whether the connection stays open after the response (RFC 9112 §9.3):
/// HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with `keep-alive`.
fn connection_persists(version: Version, fields: &HeaderMap) -> bool {
    let has = |token: &str| {
        fields.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if version == Version::HTTP_10 {
        has("keep-alive")
    } else {
        !has("close")
    }
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes to go.
    Data(u64),
    /// After chunk data, at its CRLF.
    DataEnd,
    /// After the last chunk, at the trailer section.
    Trailers,
}

/// Takes a response body out of the read buffer, frame by frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decoder {
    /// This many bytes to go (`Content-Length`).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunk),
    /// Everything until the server closes the connection.
    Close,
    /// The body has ended.
    Done,
}

/// One step of [`Decoder::decode`].
#[derive(Debug, PartialEq)]
pub(super) enum Decoded {
    /// Body data.
    Data(Bytes),
    /// The trailer fields; the body has ended.
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// More bytes are needed.
    More,
}

impl Decoder {
    /// Whether the body has ended.
    pub(super) fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// The exact number of body bytes still to come, when known.
    pub(super) fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next piece of the body from `buf`. Data is sliced out of
    /// the buffer, never copied.
    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            match *self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let (data, left) = take_up_to(buf, left);
                    *self = if left == 0 {
                        Decoder::Done
                    } else {
                        Decoder::Length(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                Decoder::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Decoder::Chunked(Chunk::Size) => {
                    let Some(line_end) = buf.iter().position(|&b| b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(ProtocolError::ChunkSize);
                        }
                        return Ok(Decoded::More);
                    };
                    if line_end > MAX_CHUNK_LINE {
                        return Err(ProtocolError::ChunkSize);
                    }
                    let size = chunk_size(&buf[..line_end])?;
                    let _ = buf.split_to(line_end + 1);
                    *self = Decoder::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Decoder::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let (data, left) = take_up_to(buf, left);
                    *self = Decoder::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Decoded::Data(data));
                }
                Decoder::Chunked(Chunk::DataEnd) => match line_break(buf) {
                    Some(Ok(n)) => {
                        let _ = buf.split_to(n);
                        *self = Decoder::Chunked(Chunk::Size);
                    }
                    Some(Err(())) => return Err(ProtocolError::ChunkEnd),
                    None => return Ok(Decoded::More),
                },
                Decoder::Chunked(Chunk::Trailers) => {
                    if let Some(found) = line_break(buf) {
                        if let Ok(n) = found {
                            let _ = buf.split_to(n);
                            *self = Decoder::Done;
                            return Ok(Decoded::End);
                        }
                    } else {
                        return Ok(Decoded::More);
                    }
                    // As many trailer fields as a head may have fields.
                    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
                    let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, _))) if len > MAX_HEAD_BYTES => {
                            return Err(ProtocolError::Trailers)
                        }
                        Ok(httparse::Status::Complete((len, parsed))) => {
                            let mut map = HeaderMap::with_capacity(parsed.len());
                            for f in parsed {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| ProtocolError::Trailers)?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| ProtocolError::Trailers)?;
                                let name_str = name.as_str();
                                if !FRAMING_FIELDS.contains(&name_str)
                                    && !NOT_IN_TRAILERS.contains(&name_str)
                                {
                                    map.append(name, value);
                                }
                            }
                            (len, map)
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => {
                            return Ok(Decoded::More)
                        }
                        _ => return Err(ProtocolError::Trailers),
                    };
                    let _ = buf.split_to(len);
                    *self = Decoder::Done;
                    return Ok(Decoded::Trailers(trailers));
                }
            }
        }
    }

    /// What the end of the connection means here: the end of a body that
    /// runs until close, or a body cut short.
    pub(super) fn at_eof(&mut self) -> Result<(), ProtocolError> {
        match self {
            Decoder::Close | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(ProtocolError::Incomplete),
        }
    }
}

/// The fields of the connection and of the message's framing, which
/// Portico writes for each hop itself: no rule may set them, and no
/// trailer carries them.
pub(crate) const FRAMING_FIELDS: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Besides [`FRAMING_FIELDS`], the fields an origin's trailers lose (RFC
/// 9110 §6.5.1): routing and authentication fields, and those that say how
/// the response is to be handled, which were settled with its head. An
/// HTTP/2 client would take them for the stream's own, or refuse the
/// stream (a connection-specific field is malformed there, RFC 9113
/// §8.2.2); an HTTP/1.1 client is sent no trailers at all.
const NOT_IN_TRAILERS: [&str; 18] = [
    "content-encoding",
    "content-type",
    "content-range",
    "host",
    "authorization",
    "proxy-authenticate",
    "www-authenticate",
    "set-cookie",
    "cache-control",
    "expires",
    "age",
    "date",
    "location",
    "retry-after",
    "vary",
    "etag",
    "last-modified",
    "pragma",
];

/// Takes at most `left` bytes from the front of a non-empty `buf`: the
/// bytes, and how many are still to come after them.
fn take_up_to(buf: &mut BytesMut, left: u64) -> (Bytes, u64) {
    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
    (buf.split_to(take).freeze(), left - take as u64)
}

/// What Portico's client makes of one response: see [`decode_response`].
#[derive(Debug, PartialEq)]
pub struct DecodedResponse {
    /// The final status (interim answers skipped).
    pub status: StatusCode,
    /// The response fields.
    pub fields: HeaderMap,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// The trailer fields of a chunked body.
    pub trailers: Option<HeaderMap>,
    /// Whether the body reached its end (for a body delimited by the
    /// connection's end, the end of `wire` counts as that end).
    pub complete: bool,
    /// Whether the connection could carry another request afterwards.
    pub keep_alive: bool,
}

/// Decodes the response in `wire` as Portico's client does, fed to it in
/// pieces of `step` bytes as reads would bring them; the end of `wire` is
/// the end of the connection. The answer must not depend on `step`. For
/// fuzzing and tests: the client itself decodes from its connection's
/// buffer as bytes arrive.
pub fn decode_response(
    wire: &[u8],
    head_request: bool,
    step: usize,
) -> Result<DecodedResponse, ProtocolError> {
    let mut pieces = wire.chunks(step.max(1));
    let mut buf = BytesMut::new();
    let head = loop {
        match parse_response_head(&mut buf, head_request)? {
            Parsed::Final(head) => break head,
            Parsed::Interim => continue,
            Parsed::Partial => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => return Err(ProtocolError::Incomplete),
            },
        }
    };
    let ResponseHead {
        status,
        fields,
        body: mut decoder,
        keep_alive,
        ..
    } = *head;
    let mut body = Vec::new();
    let mut trailers = None;
    let complete = loop {
        match decoder.decode(&mut buf)? {
            Decoded::Data(data) => body.extend_from_slice(&data),
            Decoded::Trailers(fields) => trailers = Some(fields),
            Decoded::End => break true,
            Decoded::More => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => break decoder.at_eof().is_ok(),
            },
        }
    };
    Ok(DecodedResponse {
        status,
        fields,
        body,
        trailers,
        complete,
        keep_alive: keep_alive && complete && buf.is_empty() && pieces.next().is_none(),
    })
}

/// A CRLF (or a bare LF, RFC 9112 §2.2) at the start of `buf`: its length,
/// an error for anything else, or none when more bytes are needed.
fn line_break(buf: &[u8]) -> Option<Result<usize, ()>> {
    match buf {
        [] | [b'\r'] => None,
        [b'\n', ..] => Some(Ok(1)),
        [b'\r', b'\n', ..] => Some(Ok(2)),
        _ => Some(Err(())),
    }
}

/// The size in a chunk-size line (without its LF): hexadecimal digits, then
/// optional whitespace and extensions, which are ignored (RFC 9112 §7.1.1).
fn chunk_size(line: &[u8]) -> Result<u64, ProtocolError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // A CR anywhere else is not a line end and not allowed in extensions.
    if line.contains(&b'\r') {
        return Err(ProtocolError::ChunkSize);
    }
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ProtocolError::ChunkSize);
    }
    let rest = &line[digits..];
    let spaces = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    if rest.get(spaces).is_some_and(|&b| b != b';') {
        return Err(ProtocolError::ChunkSize);
    }
    // Leading zeros are allowed however many; the value must fit 64 bits.
    let first = line[..digits]
        .iter()
        .position(|&b| b != b'0')
        .unwrap_or(digits - 1);
    let significant = &line[first..digits];
    if significant.len() > 16 {
        return Err(ProtocolError::ChunkSize);
    }
    let text = std::str::from_utf8(significant).map_err(|_| ProtocolError::ChunkSize)?;
    u64::from_str_radix(text, 16).map_err(|_| ProtocolError::ChunkSize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_names_are_the_names_at_their_place() {
        let mut names = FieldNames::default();
        assert_eq!(names.name(0, b"Content-Type").unwrap(), "content-type");
        assert_eq!(names.name(1, b"X-Custom").unwrap(), "x-custom");
        // Found again where they were, and not taken for another name.
        assert_eq!(names.name(0, b"Content-Type").unwrap(), "content-type");
        assert_eq!(names.name(1, b"X-Other").unwrap(), "x-other");
        assert_eq!(names.name(1, b"X-Other").unwrap(), "x-other");
        assert!(names.name(0, b"bad name").is_none());
        assert_eq!(names.name(0, b"Content-Type").unwrap(), "content-type");
        // Beyond what is kept, names are still parsed.
        assert_eq!(names.name(40, b"Late").unwrap(), "late");
    }

    #[test]
    fn host_fields_are_host_and_port() {
        for (value, valid) in [
            ("shop.example", true),
            ("Shop.Example:8080", true),
            ("shop.example:", true),
            ("[::1]", true),
            ("[::1]:8443", true),
            ("127.0.0.1:80", true),
            ("", false),
            (":80", false),
            ("user@shop.example", false),
            ("shop.example:http", false),
            ("a:1:2", false),
            ("[::1", false),
            ("[::1]x", false),
            ("shop example", false),
            ("shop.example/x", false),
        ] {
            assert_eq!(valid_host_field(value.as_bytes()), valid, "{value:?}");
        }
    }

    fn head(text: &str, head_request: bool) -> Result<Parsed, ProtocolError> {
        parse_response_head(&mut BytesMut::from(text), head_request)
    }

    fn final_head(text: &str) -> ResponseHead {
        match head(text, false) {
            Ok(Parsed::Final(h)) => *h,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    /// Decodes all of `wire` in pieces of `step` bytes, as reads would
    /// bring it: the data, the trailers, and whether the body ended.
    fn decode_all(
        mut decoder: Decoder,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>, bool), ProtocolError> {
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = None;
        let mut pieces = wire.chunks(step.max(1));
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((data, trailers, true)),
                Decoded::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Ok((data, trailers, false)),
                },
            }
        }
    }

    #[test]
    fn request_heads_are_origin_form_with_framing_of_our_own() {
        let mut fields = HeaderMap::new();
        fields.insert("host", HeaderValue::from_static("a.example"));
        fields.insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        fields.insert(TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        fields.append("x-two", HeaderValue::from_static("1"));
        fields.append("x-two", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::POST,
            "/p?q=1",
            &fields,
            b"via: 1.1 portico\r\n",
            RequestFraming::Length(5),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: a.example\r\nx-two: 1\r\nx-two: 2\r\nvia: 1.1 portico\r\ncontent-length: 5\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request_head(
            &mut out,
            &Method::GET,
            "/",
            &HeaderMap::new(),
            b"",
            RequestFraming::None,
        );
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn request_framing_follows_the_body_and_method() {
        use RequestFraming::{Chunked, Length};
        let table = [
            (Method::GET, true, Some(0), RequestFraming::None),
            (Method::GET, false, Some(0), RequestFraming::None),
            (Method::DELETE, true, None, RequestFraming::None),
            (Method::POST, true, Some(0), Length(0)),
            (Method::PUT, false, Some(0), Length(0)),
            (Method::POST, false, Some(12), Length(12)),
            (Method::POST, false, None, Chunked),
            (Method::GET, false, None, Chunked),
        ];
        for (method, empty, exact, want) in table {
            assert_eq!(
                request_framing(&method, empty, exact),
                want,
                "{method} {empty} {exact:?}"
            );
        }
    }

    #[test]
    fn request_bodies_are_framed_and_their_length_checked() {
        let mut out = Vec::new();
        let mut chunked = BodyEncoder::new(RequestFraming::Chunked);
        chunked.data(b"hello world, ", &mut out).unwrap();
        chunked.data(b"", &mut out).unwrap();
        chunked.data(b"bye", &mut out).unwrap();
        chunked.finish(&mut out).unwrap();
        assert_eq!(out, b"d\r\nhello world, \r\n3\r\nbye\r\n0\r\n\r\n");

        let mut out = Vec::new();
        let mut sized = BodyEncoder::new(RequestFraming::Length(4));
        sized.data(b"ab", &mut out).unwrap();
        assert_eq!(
            sized.finish(&mut Vec::new()),
            Err(ProtocolError::RequestLength)
        );
        assert_eq!(
            sized.data(b"abc", &mut out),
            Err(ProtocolError::RequestLength)
        );
        sized.data(b"cd", &mut out).unwrap();
        sized.finish(&mut out).unwrap();
        assert_eq!(out, b"abcd");
        assert_eq!(
            BodyEncoder::new(RequestFraming::None).data(b"x", &mut Vec::new()),
            Err(ProtocolError::RequestLength)
        );
    }

    #[test]
    fn response_heads_parse_into_fields_and_framing() {
        let h = final_head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: one\r\nx-a: two \r\n\r\n");
        assert_eq!(h.status, StatusCode::OK);
        // Leading zeros are digits like any other.
        let long =
            final_head("HTTP/1.1 200 OK\r\nContent-Length: 00000000000000000000000005\r\n\r\n");
        assert_eq!(long.body, Decoder::Length(5));
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.body, Decoder::Length(5));
        assert!(h.keep_alive);
        let values: Vec<_> = h.fields.get_all("x-a").iter().collect();
        assert_eq!(values, ["one", "two"]);

        let table: [(&str, Decoder, bool); 9] = [
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Decoder::Chunked(Chunk::Size),
                true,
            ),
            // Empty list elements are no codings.
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: , Chunked\r\n\r\n",
                Decoder::Chunked(Chunk::Size),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nTransfer-Encoding: chunked\r\n\r\n",
                Decoder::Chunked(Chunk::Size),
                true,
            ),
            // Both: Content-Length is dropped and the connection not reused.
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                Decoder::Chunked(Chunk::Size),
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Decoder::Close, false),
            ("HTTP/1.1 204 No Content\r\n\r\n", Decoder::Done, true),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                Decoder::Done,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                Decoder::Done,
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: Keep-Alive\r\n\r\n",
                Decoder::Length(2),
                true,
            ),
        ];
        for (text, body, keep_alive) in table {
            let h = final_head(text);
            assert_eq!((h.body, h.keep_alive), (body, keep_alive), "{text:?}");
            if text.contains("chunked") {
                assert!(!h.fields.contains_key(CONTENT_LENGTH), "{text:?}");
            }
        }
        assert!(!final_head("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n").keep_alive);
        let chunked_10 =
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n";
        assert!(!final_head(chunked_10).keep_alive);
        assert!(
            !final_head("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: foo, close\r\n\r\n")
                .keep_alive
        );
        match head("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true) {
            Ok(Parsed::Final(h)) => assert_eq!(h.body, Decoder::Done),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn response_heads_that_are_bad_are_refused() {
        let bad = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
                ProtocolError::ContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                ProtocolError::ContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                ProtocolError::ContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
                ProtocolError::ContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                ProtocolError::ContentLength,
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                ProtocolError::UnexpectedUpgrade,
            ),
        ];
        for (text, want) in bad {
            assert_eq!(head(text, false).unwrap_err(), want, "{text:?}");
        }
        // Transfer codings besides one chunked, however written.
        for codings in [
            "gzip, chunked",
            "gzip",
            "chunked, gzip",
            "deflate\r\nTransfer-Encoding: chunked",
            "identity",
            "chunked;x=1",
            "chunked, chunked",
            "chunked\r\nTransfer-Encoding: chunked",
            "",
            " , ",
        ] {
            let text = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {codings}\r\n\r\n");
            assert!(
                matches!(head(&text, false), Err(ProtocolError::TransferCoding(_))),
                "{codings:?}"
            );
        }
        // No body follows these, whatever their fields say.
        for text in [
            "HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        ] {
            assert_eq!(final_head(text).body, Decoder::Done, "{text:?}");
        }
        assert!(matches!(
            head("HTTP/1.1 2000 OK\r\n\r\n", false),
            Err(ProtocolError::Head(_))
        ));
        assert!(matches!(
            head("SMTP ready\r\n\r\n", false),
            Err(ProtocolError::Head(_))
        ));
        // Equal repeats are one length.
        assert_eq!(
            final_head("HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\n\r\n").body,
            Decoder::Length(4)
        );
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&huge, false).unwrap_err(), ProtocolError::HeadTooLarge);
        let many: String = (0..MAX_FIELDS + 1)
            .map(|i| format!("x-{i}: 1\r\n"))
            .collect();
        let many = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(
            head(&many, false),
            Err(ProtocolError::Head(httparse::Error::TooManyHeaders))
        ));
    }

    #[test]
    fn partial_and_interim_heads_take_nothing_or_themselves() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Le");
        assert!(matches!(
            parse_response_head(&mut buf, false),
            Ok(Parsed::Partial)
        ));
        assert_eq!(buf.len(), 27);
        let mut buf = BytesMut::from("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi");
        assert!(matches!(
            parse_response_head(&mut buf, false),
            Ok(Parsed::Interim)
        ));
        assert!(matches!(
            parse_response_head(&mut buf, false),
            Ok(Parsed::Interim)
        ));
        match parse_response_head(&mut buf, false) {
            Ok(Parsed::Final(h)) => assert_eq!(h.status, StatusCode::OK),
            other => panic!("{other:?}"),
        }
        assert_eq!(&buf[..], b"hi");
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_arrive() {
        let wire = b"5\r\nhello\r\nB;ext=1\r\n, chunked!!\r\n0\r\nX-Sum: 9\r\n\r\n";
        for step in [1, 2, 3, 7, 64] {
            let (data, trailers, ended) =
                decode_all(Decoder::Chunked(Chunk::Size), wire, step).unwrap();
            assert_eq!(data, b"hello, chunked!!", "step {step}");
            assert!(ended);
            assert_eq!(trailers.unwrap()["x-sum"], "9");
        }
        // No trailers; bare LF line ends; upper-case hex.
        let (data, trailers, ended) =
            decode_all(Decoder::Chunked(Chunk::Size), b"A\nabcdefghij\n0\n\n", 4).unwrap();
        assert_eq!(
            (data.as_slice(), trailers, ended),
            (&b"abcdefghij"[..], None, true)
        );
        // Leading zeros, however many; spaces before an extension.
        let wire = b"00000000000000000003 ;x=y\r\nabc\r\n0\r\n\r\n";
        let (data, _, ended) = decode_all(Decoder::Chunked(Chunk::Size), wire, 5).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"abc"[..], true));
        // Cut short: not ended.
        let (_, _, ended) = decode_all(Decoder::Chunked(Chunk::Size), b"5\r\nhel", 2).unwrap();
        assert!(!ended);
        // More trailer fields than a small table would hold.
        let mut wire = b"2\r\nok\r\n0\r\n".to_vec();
        for i in 0..100 {
            wire.extend_from_slice(format!("x-t{i}: {i}\r\n").as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        let (data, trailers, ended) = decode_all(Decoder::Chunked(Chunk::Size), &wire, 64).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"ok"[..], true));
        assert_eq!(trailers.unwrap()["x-t99"], "99");
        // Fields no trailer may carry are dropped; the others are kept.
        let wire = b"2\r\nok\r\n0\r\nx-sum: abc\r\nconnection: close\r\ncontent-length: 9\r\nset-cookie: a=1\r\n\r\n";
        let (_, trailers, ended) = decode_all(Decoder::Chunked(Chunk::Size), wire, 64).unwrap();
        let trailers = trailers.unwrap();
        assert!(ended);
        assert_eq!(trailers.len(), 1, "{trailers:?}");
        assert_eq!(trailers["x-sum"], "abc");
    }

    #[test]
    fn bad_chunks_are_errors() {
        let bad: [(&[u8], ProtocolError); 7] = [
            (b"x\r\n", ProtocolError::ChunkSize),
            (b"\r\n", ProtocolError::ChunkSize),
            (b"5 x\r\nhello\r\n", ProtocolError::ChunkSize),
            (b"11111111111111111\r\n", ProtocolError::ChunkSize),
            (b"2\r\nhiXX", ProtocolError::ChunkEnd),
            (b"5;a\rb\r\nhello\r\n", ProtocolError::ChunkSize),
            (b"5\r\r\nhello\r\n", ProtocolError::ChunkSize),
        ];
        for (wire, want) in bad {
            assert_eq!(
                decode_all(Decoder::Chunked(Chunk::Size), wire, 64).unwrap_err(),
                want,
                "{wire:?}"
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert_eq!(
            decode_all(Decoder::Chunked(Chunk::Size), &long, 64).unwrap_err(),
            ProtocolError::ChunkSize
        );
    }

    #[test]
    fn sized_and_close_delimited_bodies() {
        let (data, _, ended) = decode_all(Decoder::Length(5), b"helloEXTRA", 3).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"hello"[..], true));
        let (data, _, ended) = decode_all(Decoder::Close, b"until the end", 4).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"until the end"[..], false));
        let mut close = Decoder::Close;
        assert_eq!(close.at_eof(), Ok(()));
        assert!(close.is_done());
        assert_eq!(Decoder::Length(3).at_eof(), Err(ProtocolError::Incomplete));
        assert_eq!(
            Decoder::Chunked(Chunk::Data(1)).at_eof(),
            Err(ProtocolError::Incomplete)
        );
        assert_eq!(Decoder::Length(7).remaining(), Some(7));
        assert_eq!(Decoder::Close.remaining(), None);
    }

    proptest::proptest! {
        /// `parsed_value` skips `HeaderValue`'s own check: every value
        /// httparse accepts, in a request or a response head, must be one
        /// `HeaderValue` accepts too, whatever its bytes.
        #[test]
        fn values_httparse_accepts_are_valid_header_values(
            // Weighted to the edges of both sets: controls, HTAB, space,
            // DEL and obs-text, among plain letters.
            value in proptest::collection::vec(
                proptest::prop_oneof![0x00u8..0x21, 0x7eu8..0x82, 0xf0u8..=0xff, proptest::strategy::Just(b'a')],
                0..64,
            ),
        ) {
            let mut wire = b"x-v: ".to_vec();
            wire.extend_from_slice(&value);
            wire.extend_from_slice(b"\r\n\r\n");
            let response = [b"HTTP/1.1 200 OK\r\n".as_slice(), &wire].concat();
            let mut fields = [httparse::EMPTY_HEADER; 2];
            let mut parsed = httparse::Response::new(&mut fields);
            if let Ok(httparse::Status::Complete(_)) = parsed.parse(&response) {
                let v = parsed.headers[0].value;
                proptest::prop_assert!(HeaderValue::from_bytes(v).is_ok(), "{:?}", v);
            }
            let request = [b"GET / HTTP/1.1\r\n".as_slice(), &wire].concat();
            let mut fields = [httparse::EMPTY_HEADER; 2];
            let mut parsed = httparse::Request::new(&mut fields);
            if let Ok(httparse::Status::Complete(_)) = parsed.parse(&request) {
                let v = parsed.headers[0].value;
                proptest::prop_assert!(HeaderValue::from_bytes(v).is_ok(), "{:?}", v);
            }
        }

        /// However the bytes of a response are split into reads, it
        /// decodes to the same thing, and a chunked body to its data.
        #[test]
        fn decoding_does_not_depend_on_how_the_bytes_arrive(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..40), 0..6),
            trailer in proptest::option::of("[a-z]{1,8}"),
            ext in proptest::bool::ANY,
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
            step in 1usize..50,
        ) {
            let mut wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            let mut data = Vec::new();
            for chunk in &chunks {
                let ext = if ext { ";x=1" } else { "" };
                wire.extend_from_slice(format!("{:x}{ext}\r\n", chunk.len()).as_bytes());
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
                data.extend_from_slice(chunk);
            }
            wire.extend_from_slice(b"0\r\n");
            if let Some(t) = &trailer {
                wire.extend_from_slice(format!("x-t: {t}\r\n").as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
            let whole = decode_response(&wire, false, wire.len()).unwrap();
            proptest::prop_assert_eq!(&whole.body, &data);
            proptest::prop_assert!(whole.complete && whole.keep_alive);
            proptest::prop_assert_eq!(whole.trailers.is_some(), trailer.is_some());
            proptest::prop_assert_eq!(decode_response(&wire, false, step).unwrap(), whole);
            // Whatever follows: the same answer at every split too.
            wire.extend_from_slice(&tail);
            proptest::prop_assert_eq!(
                decode_response(&wire, false, step),
                decode_response(&wire, false, wire.len())
            );
        }
    }
}
