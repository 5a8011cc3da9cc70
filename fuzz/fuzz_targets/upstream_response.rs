//! Arbitrary bytes from a backend through Portico's HTTP/1.1 client
//! decoding: the response head, interim answers, and bodies framed by
//! length, chunked coding or the connection's end. Decoding never panics,
//! gives the same answer however the bytes are split into reads, and never
//! makes up body bytes.
//!
//! The first byte picks the read size (its low 6 bits, plus one) and whether
//! the request was HEAD (its top bit); the rest is what the backend sent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::upstream::decode_response;

fuzz_target!(|data: &[u8]| {
    let Some((&control, wire)) = data.split_first() else {
        return;
    };
    let step = usize::from(control & 0x3f) + 1;
    let head_request = control & 0x80 != 0;
    let split = decode_response(wire, head_request, step);
    let whole = decode_response(wire, head_request, wire.len());
    assert_eq!(split, whole, "the answer depends on how the bytes arrive");
    if let Ok(response) = whole {
        assert!(response.body.len() <= wire.len());
        if head_request {
            assert!(response.body.is_empty());
        }
    }
});
