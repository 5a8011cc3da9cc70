//! The cache store against a real disk tier in a temporary directory:
//! restarts, purges that survive restarts, corrupt files and large objects.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use portico::cache::control::{response_directives, Overrides, DEFAULT_HEURISTIC_MAX};
use portico::cache::entry::Received;
use portico::cache::store::root_key;
use portico::cache::{Entry, Lookup, Store, StoreConfig};

const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test took too long")
}

fn config(dir: &Path, memory_bytes: usize) -> StoreConfig {
    StoreConfig {
        memory_bytes,
        disk_dir: Some(dir.to_path_buf()),
        disk_bytes: 64 << 20,
        max_object_bytes: 2 << 20,
    }
}

fn response(
    cache_control: &str,
    extra: &[(&str, &str)],
    body: Bytes,
    request: &HeaderMap,
) -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(cache_control).unwrap(),
    );
    for (name, value) in extra {
        headers.append(
            header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let directives = response_directives(&headers, &[]);
    let now = SystemTime::now();
    Entry::from_response(
        Received {
            status: StatusCode::OK,
            headers,
            body: body.to_vec(),
            request_headers: request,
            request_time: now,
            response_time: now,
        },
        &directives,
        &Overrides::default(),
        DEFAULT_HEURISTIC_MAX,
    )
    .unwrap()
}

fn plain(body: &'static str) -> Entry {
    response(
        "max-age=3600",
        &[],
        Bytes::from_static(body.as_bytes()),
        &HeaderMap::new(),
    )
}

fn hit(lookup: Lookup) -> Option<Entry> {
    match lookup {
        Lookup::Hit(entry) => Some(Entry::clone(&entry)),
        Lookup::Miss | Lookup::VaryMiss => None,
    }
}

#[tokio::test]
async fn insert_get_and_restart_keeps_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let original = plain("hello");
    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        assert!(store.store_response("/a", original.clone()).await);
        assert_eq!(
            hit(store.lookup("/a", &HeaderMap::new()).await),
            Some(original.clone())
        );
        assert!(matches!(
            store.lookup("/b", &HeaderMap::new()).await,
            Lookup::Miss
        ));
        store.close().await.unwrap();
        drop(store);

        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        assert_eq!(
            hit(store.lookup("/a", &HeaderMap::new()).await),
            Some(original)
        );
        store.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn stored_fields_do_not_hold_the_buffer_they_arrived_in() {
    // hyper's header values are slices of its read buffer; a stored entry
    // that kept them would keep the whole buffer for as long as it lives.
    let buffer = Bytes::from(vec![b'x'; 32 * 1024]);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=3600"),
    );
    headers.insert(
        header::ETAG,
        HeaderValue::from_maybe_shared(buffer.slice(0..8)).unwrap(),
    );
    let directives = response_directives(&headers, &[]);
    let now = SystemTime::now();
    let entry = Entry::from_response(
        Received {
            status: StatusCode::OK,
            headers,
            body: b"body".to_vec(),
            request_headers: &HeaderMap::new(),
            request_time: now,
            response_time: now,
        },
        &directives,
        &Overrides::default(),
        DEFAULT_HEURISTIC_MAX,
    )
    .unwrap();
    let expected = entry.clone();
    assert_eq!(expected.headers()[header::ETAG], "xxxxxxxx");
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        assert!(store.store_response("/a", entry).await);
        assert!(
            buffer.is_unique(),
            "the stored entry references the read buffer"
        );
        assert_eq!(
            hit(store.lookup("/a", &HeaderMap::new()).await),
            Some(expected)
        );
        store.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn purge_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        store.store_response("/gone", plain("old")).await;
        store.store_response("/kept", plain("kept")).await;
        store.close().await.unwrap();
        drop(store);

        // After a restart the index is empty: the exact purge still works.
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        assert_eq!(store.purge("/gone"), 1);
        assert!(store.get(&root_key("/gone")).await.is_none());
        store.close().await.unwrap();
        drop(store);

        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        assert!(store.get(&root_key("/gone")).await.is_none());
        assert!(store.get(&root_key("/kept")).await.is_some());
        store.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn vary_variants_are_found_and_purged_together() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        let mut gzip = HeaderMap::new();
        gzip.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let mut br = HeaderMap::new();
        br.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, gzip"),
        );
        let identity = HeaderMap::new();
        let vary = [("vary", "Accept-Encoding")];
        let gz = response("max-age=60", &vary, Bytes::from_static(b"gz"), &gzip);
        let brotli = response("max-age=60", &vary, Bytes::from_static(b"br"), &br);
        store.store_response("/v", gz.clone()).await;
        store.store_response("/v", brotli.clone()).await;

        let found = hit(store.lookup("/v", &gzip).await).unwrap();
        assert_eq!(found.body_slice(), gz.body_slice());
        let found = hit(store.lookup("/v", &br).await).unwrap();
        assert_eq!(found.body_slice(), brotli.body_slice());
        assert!(matches!(
            store.lookup("/v", &identity).await,
            Lookup::VaryMiss
        ));

        // Root marker plus two variants.
        assert_eq!(store.purge("/v"), 3);
        assert!(matches!(store.lookup("/v", &gzip).await, Lookup::Miss));

        // Storing again after the purge starts a new generation: the old
        // variants are not revived even if one had survived.
        let again = response("max-age=60", &vary, Bytes::from_static(b"gz2"), &gzip);
        store.store_response("/v", again).await;
        assert!(matches!(store.lookup("/v", &br).await, Lookup::VaryMiss));
        assert_eq!(
            hit(store.lookup("/v", &gzip).await).unwrap().body_slice(),
            b"gz2"
        );
        store.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn purge_by_prefix_and_tag_and_soft_purge() {
    let store = bounded(Store::open(StoreConfig {
        memory_bytes: 1 << 20,
        disk_dir: None,
        disk_bytes: 0,
        max_object_bytes: 1 << 20,
    }))
    .await
    .unwrap();
    bounded(async {
        let none = HeaderMap::new();
        let tagged = |body: &'static str| {
            response(
                "max-age=60, stale-while-revalidate=30",
                &[
                    ("surrogate-key", "product-7 listing"),
                    ("cache-tag", "shop"),
                ],
                Bytes::from_static(body.as_bytes()),
                &none,
            )
        };
        store.store_response("/shop/1", tagged("1")).await;
        store.store_response("/shop/2", tagged("2")).await;
        store.store_response("/blog/1", plain("b")).await;

        // Soft purge keeps the entry but stale, within its swr window.
        assert_eq!(store.soft_purge_tag("listing").await, 2);
        let soft = hit(store.lookup("/shop/1", &none).await).unwrap();
        assert!(soft.soft_purged);
        assert!(soft.ttl_at(SystemTime::now()) <= 0);

        assert_eq!(store.purge_tag("product-7"), 2);
        assert!(matches!(store.lookup("/shop/2", &none).await, Lookup::Miss));
        assert_eq!(store.purge_prefix("/blog/"), 1);
        assert!(matches!(store.lookup("/blog/1", &none).await, Lookup::Miss));
    })
    .await;
}

#[tokio::test]
async fn expired_entries_are_removed_on_read() {
    let store = bounded(Store::open(StoreConfig {
        memory_bytes: 1 << 20,
        disk_dir: None,
        disk_bytes: 0,
        max_object_bytes: 1 << 20,
    }))
    .await
    .unwrap();
    let none = HeaderMap::new();
    let expired = response("max-age=0", &[], Bytes::from_static(b"x"), &none);
    let stale_ok = response(
        "max-age=0, stale-if-error=600",
        &[],
        Bytes::from_static(b"y"),
        &none,
    );
    bounded(async {
        store.store_response("/expired", expired).await;
        store.store_response("/sie", stale_ok).await;
        assert!(matches!(
            store.lookup("/expired", &none).await,
            Lookup::Miss
        ));
        assert!(hit(store.lookup("/sie", &none).await).is_some());
    })
    .await;
}

#[tokio::test]
async fn objects_above_max_object_bytes_are_refused() {
    let store = bounded(Store::open(StoreConfig {
        memory_bytes: 1 << 20,
        disk_dir: None,
        disk_bytes: 0,
        max_object_bytes: 1024,
    }))
    .await
    .unwrap();
    let big = response(
        "max-age=60",
        &[],
        Bytes::from(vec![b'x'; 4096]),
        &HeaderMap::new(),
    );
    assert!(!bounded(store.store_response("/big", big)).await);
    assert!(matches!(
        bounded(store.lookup("/big", &HeaderMap::new())).await,
        Lookup::Miss
    ));
}

#[tokio::test]
async fn an_object_near_max_object_bytes_reaches_disk() {
    let dir = tempfile::tempdir().unwrap();
    // 2 MiB limit, a body just under it, a memory tier far smaller.
    let body = Bytes::from(
        (0..(2 << 20) - 8192)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let entry = response("max-age=3600", &[], body, &HeaderMap::new());
    assert!(entry.encoded_len() <= 2 << 20);
    bounded(async {
        let store = Store::open(config(dir.path(), 64 << 10)).await.unwrap();
        assert!(store.store_response("/large", entry.clone()).await);
        store.close().await.unwrap();
        drop(store);

        let store = Store::open(config(dir.path(), 64 << 10)).await.unwrap();
        let found = hit(store.lookup("/large", &HeaderMap::new()).await);
        assert_eq!(found, Some(entry));
        store.close().await.unwrap();
    })
    .await;
}

/// Flips every byte of every occurrence of `needle` in the files under
/// `dir`; returns how many occurrences were found.
fn corrupt_occurrences(dir: &Path, needle: &[u8]) -> usize {
    let mut found = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
            continue;
        }
        let mut data = std::fs::read(&path).unwrap();
        let mut changed = false;
        let mut i = 0;
        while i + needle.len() <= data.len() {
            if &data[i..i + needle.len()] == needle {
                data[i + needle.len() / 2] ^= 0xff;
                found += 1;
                changed = true;
                i += needle.len();
            } else {
                i += 1;
            }
        }
        if changed {
            std::fs::write(&path, &data).unwrap();
        }
    }
    found
}

#[tokio::test]
async fn corrupt_disk_entries_are_dropped_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let marker = b"PORTICO-CORRUPTION-TARGET-0123456789";
    let body = Bytes::from_static(marker);
    let entry = response("max-age=3600", &[], body, &HeaderMap::new());
    let intact = plain("intact");
    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        store.store_response("/corrupt", entry).await;
        store.store_response("/intact", intact.clone()).await;
        store.close().await.unwrap();
    })
    .await;

    assert!(
        corrupt_occurrences(dir.path(), marker) >= 1,
        "entry never reached disk"
    );

    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        assert!(matches!(
            store.lookup("/corrupt", &HeaderMap::new()).await,
            Lookup::Miss
        ));
        assert_eq!(
            hit(store.lookup("/intact", &HeaderMap::new()).await),
            Some(intact)
        );
        store.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn garbage_over_all_disk_files_opens_empty_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        store.store_response("/a", plain("a")).await;
        store.close().await.unwrap();
    })
    .await;

    let mut stack = vec![dir.path().to_path_buf()];
    let mut files = 0;
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
            continue;
        }
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        let garbage: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
        std::fs::write(&path, garbage).unwrap();
        files += 1;
    }
    assert!(files > 0);

    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        assert!(matches!(
            store.lookup("/a", &HeaderMap::new()).await,
            Lookup::Miss
        ));
        store.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn prefix_and_tag_purges_reach_entries_stored_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let none = HeaderMap::new();
    let with_tag = |tag: &'static str, body: &'static str| {
        response(
            "max-age=3600, stale-while-revalidate=3600",
            &[("surrogate-key", tag)],
            Bytes::from_static(body.as_bytes()),
            &HeaderMap::new(),
        )
    };
    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        store.store_response("/shop/1", with_tag("red", "s1")).await;
        store.store_response("/shop/2", with_tag("red", "s2")).await;
        store
            .store_response("/blog/1", with_tag("blue", "b1"))
            .await;
        store
            .store_response("/blog/2", with_tag("news", "b2"))
            .await;
        store
            .store_response("/keep/1", with_tag("green", "k1"))
            .await;
        store.close().await.unwrap();
    })
    .await;
    // The next store opens strictly later than these entries arrived.
    tokio::time::sleep(Duration::from_millis(5)).await;

    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        // Nothing was read since the restart: the index knows no entry.
        assert_eq!(store.purge_prefix("/shop/"), 0);
        assert_eq!(store.purge_tag("blue"), 0);
        assert_eq!(store.soft_purge_tag("news").await, 0);
        assert!(store.keeps_bans());
        assert!(matches!(store.lookup("/shop/1", &none).await, Lookup::Miss));
        assert!(matches!(store.lookup("/blog/1", &none).await, Lookup::Miss));
        let soft = hit(store.lookup("/blog/2", &none).await).unwrap();
        assert!(soft.soft_purged, "a soft ban marks the entry stale");
        assert_eq!(soft.body_slice(), b"b2");
        assert_eq!(
            hit(store.lookup("/keep/1", &none).await)
                .unwrap()
                .body_slice(),
            b"k1"
        );
        // Stored after the bans: untouched by them.
        store.store_response("/shop/3", with_tag("red", "s3")).await;
        assert!(hit(store.lookup("/shop/3", &none).await).is_some());
        store.close().await.unwrap();
    })
    .await;

    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        // Never read in the second run: the ban, kept on disk, still holds.
        assert!(matches!(store.lookup("/shop/2", &none).await, Lookup::Miss));
        assert!(
            hit(store.lookup("/blog/2", &none).await)
                .unwrap()
                .soft_purged
        );
        assert!(hit(store.lookup("/keep/1", &none).await).is_some());
        assert!(hit(store.lookup("/shop/3", &none).await).is_some());
        store.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn bans_added_just_before_closing_hold_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let none = HeaderMap::new();
    let tagged = |tag: &'static str| {
        response(
            "max-age=3600",
            &[("surrogate-key", tag)],
            Bytes::from_static(tag.as_bytes()),
            &HeaderMap::new(),
        )
    };
    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        for i in 0..8 {
            store
                .store_response(&format!("/p/{i}"), tagged("kept"))
                .await;
        }
        store.store_response("/t/1", tagged("gone")).await;
        store.close().await.unwrap();
    })
    .await;
    tokio::time::sleep(Duration::from_millis(5)).await;

    bounded(async {
        // The ban file is written off the purge's thread; closing right
        // after the purges must still leave all of them on disk.
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        for i in 0..8 {
            assert_eq!(store.purge_prefix(&format!("/p/{i}")), 0);
        }
        assert_eq!(store.purge_tag("gone"), 0);
        store.close().await.unwrap();
    })
    .await;

    bounded(async {
        let store = Store::open(config(dir.path(), 1 << 20)).await.unwrap();
        for i in 0..8 {
            let path = format!("/p/{i}");
            assert!(
                matches!(store.lookup(&path, &none).await, Lookup::Miss),
                "{path}"
            );
        }
        assert!(matches!(store.lookup("/t/1", &none).await, Lookup::Miss));
        store.close().await.unwrap();
    })
    .await;
}

/// The policy check and the store agree on how large a disk tier must be: a
/// policy that passes the check opens, one that would not open is refused
/// with file:line:col.
#[tokio::test]
async fn a_disk_tier_the_check_accepts_is_one_the_store_opens() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let at = dir.path().display().to_string();
        let policy = |storage: &str| {
            format!(
                "storage {{ {storage} }}\nbackend app {{\n  server \"127.0.0.1:9\"\n}}\n\
                 rule all {{ route app cache {{ }} }}\n"
            )
        };
        for (storage, opens) in [
            (format!("max_object 4MiB disk \"{at}\" 16MiB"), false),
            (format!("max_object 4MiB disk \"{at}\" 17MiB"), true),
            (format!("disk \"{at}\" 2MiB max_object 1KiB"), false),
            (format!("disk \"{at}\" 4MiB max_object 1KiB"), true),
        ] {
            let text = policy(&storage);
            match portico::policy::load(&text, "sizes.policy") {
                Ok(p) => {
                    assert!(opens, "{storage}: accepted");
                    let s = &p.model.storage;
                    let (_, disk) = s.disk.clone().expect("a disk tier");
                    let store = Store::open(StoreConfig {
                        memory_bytes: 1 << 20,
                        disk_dir: Some(dir.path().to_path_buf()),
                        disk_bytes: disk as usize,
                        max_object_bytes: s.max_object as usize,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{storage}: {e}"));
                    store.close().await.expect("close");
                }
                Err(e) => {
                    assert!(!opens, "{storage}: {e}");
                    let text = e.to_string();
                    assert!(text.contains("sizes.policy:1:"), "{text}");
                    assert!(text.contains("the disk tier needs at least"), "{text}");
                }
            }
        }
    })
    .await;
}
