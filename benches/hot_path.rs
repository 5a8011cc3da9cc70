//! The per-request work besides policy evaluation: a cache hit in the store
//! (memory tier), encoding and decoding a stored entry, and compressing a
//! body on delivery.
//!
//! Run: `cargo bench --bench hot_path -- --warm-up-time 1 --measurement-time 3`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, StatusCode};
use portico::cache::control::{self, Overrides};
use portico::cache::entry::{Entry, Received};
use portico::cache::{Lookup, Store, StoreConfig};
use portico::compress;
use portico::policy::model::{Algorithm, CompressSpec};
use std::hint::black_box;
use std::time::{Duration, SystemTime};

fn entry(size: usize) -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=3600"),
    );
    headers.insert(
        "content-type",
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert("etag", HeaderValue::from_static("\"abc123\""));
    headers.insert(
        "date",
        HeaderValue::from_static("Mon, 23 Nov 2026 06:00:00 GMT"),
    );
    let request_headers = HeaderMap::new();
    let now = SystemTime::now();
    let directives = control::response_directives(&headers, &[]);
    Entry::from_response(
        Received {
            status: StatusCode::OK,
            headers,
            body: vec![b'x'; size],
            request_headers: &request_headers,
            request_time: now,
            response_time: now,
        },
        &directives,
        &Overrides::default(),
        Duration::from_secs(86_400),
    )
    .expect("storable")
}

fn store_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = rt.block_on(async {
        Store::open(StoreConfig {
            memory_bytes: 64 << 20,
            disk_dir: None,
            disk_bytes: 0,
            max_object_bytes: 1 << 20,
        })
        .await
        .expect("store")
    });
    let mut group = c.benchmark_group("store_lookup_hit");
    for n in [1_000usize, 10_000] {
        rt.block_on(async {
            for i in 0..n {
                store
                    .store_response(&format!("bench.example/obj/{i}"), entry(1024))
                    .await;
            }
        });
        let headers = HeaderMap::new();
        let key = format!("bench.example/obj/{}", n / 2);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let found = rt.block_on(store.lookup(black_box(&key), &headers));
                assert!(matches!(found, Lookup::Hit(_)));
            })
        });
    }
    group.finish();
}

fn entry_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("entry_codec");
    for size in [1024usize, 16 * 1024, 256 * 1024] {
        let e = entry(size);
        let encoded = Bytes::from(e.encode_to_vec());
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &e, |b, e| {
            b.iter(|| black_box(e.encode_to_vec()))
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, data| {
            b.iter(|| black_box(Entry::decode_bytes(data.clone()).expect("decodes")))
        });
    }
    group.finish();
}

fn compression(c: &mut Criterion) {
    let body: Vec<u8> = "<p>Portico serves this page from its cache.</p>\n"
        .repeat(16 * 1024 / 48)
        .into_bytes();
    let spec = CompressSpec {
        algorithms: vec![Algorithm::Br, Algorithm::Gzip],
        min_size: 1024,
        types: CompressSpec::default_types(),
        level: None,
    };
    let mut group = c.benchmark_group("compress_16k");
    group.throughput(Throughput::Bytes(body.len() as u64));
    for alg in [Algorithm::Gzip, Algorithm::Br] {
        group.bench_function(alg.as_str(), |b| {
            b.iter(|| black_box(compress::compress(alg, spec.level, black_box(&body))))
        });
    }
    // What a hit with a kept copy costs instead: its identity and a lookup.
    let copies = compress::Copies::new(64 << 20);
    let stored = compress::Stored {
        primary: "shop.example/index.html",
        secondary: "",
        generation: 0,
        received_ms: 1_764_000_000_000,
        len: body.len(),
    };
    for alg in [Algorithm::Gzip, Algorithm::Br] {
        group.bench_function(format!("{}_kept_copy", alg.as_str()), |b| {
            b.iter(|| {
                let identity = compress::Copies::identity(black_box(stored), alg, spec.level);
                black_box(copies.get_or_compress(identity, alg, spec.level, &body))
            })
        });
    }
    let accept = HeaderValue::from_static("gzip, deflate, br;q=0.9");
    group.bench_function("negotiate", |b| {
        b.iter(|| black_box(compress::negotiate(Some(black_box(&accept)), &spec)))
    });
    group.finish();
}

criterion_group!(benches, store_hit, entry_codec, compression);
criterion_main!(benches);
