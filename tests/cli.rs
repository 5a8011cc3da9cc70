//! The `portico` binary's language tools, run as a user would: `check`,
//! `explain` and `test`, their output and exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CLEAN: &str = r#"
backend app {
  server "127.0.0.1:3000"
}

rule assets when path ^= "/assets/" {
  route app
  cache {
    key [host, path]
    ttl 1d
  }
}

rule default {
  route app
}

test "assets are cached a day" {
  request GET "https://example.com/assets/app.css?v=2"
  expect rule assets
  expect cache_key "example.com/assets/app.css"
  expect ttl 1d
}
"#;

/// A policy with one warning (an unused backend) and no errors.
const WARNS: &str = r#"
backend app {
  server "127.0.0.1:3000"
}
backend spare {
  server "127.0.0.1:3001"
}
rule default {
  route app
}
"#;

/// A policy with two errors on known lines.
const BROKEN: &str = r#"backend app {
  server "127.0.0.1:3000"
}
rule default {
  route ap
  cache { tll 1m }
}
"#;

/// A policy whose second test expects the wrong TTL and backend.
const FAILING: &str = r#"
backend app {
  server "127.0.0.1:3000"
}
rule default {
  route app
  cache { ttl 5m }
}
test "passes" {
  request GET "http://example.com/"
  expect ttl 5m
}
test "wrong ttl" {
  request GET "http://example.com/"
  expect ttl 10m
  expect backend app
}
"#;

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write policy");
        path
    }
}

fn portico(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run portico")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn check_exits_zero_on_a_clean_policy() {
    let f = Files::new();
    f.write("clean.policy", CLEAN);
    let o = portico(&["check", "clean.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(stdout(&o), "1 file(s) checked: 0 error(s), 0 warning(s)\n");
}

#[test]
fn check_exits_zero_with_warnings_and_one_when_they_are_denied() {
    let f = Files::new();
    f.write("warns.policy", WARNS);
    let o = portico(&["check", "warns.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("warns.policy:5:9: warning: backend `spare` is never routed to [unused]\n"),
        "{out}"
    );
    assert!(
        out.ends_with("1 file(s) checked: 0 error(s), 1 warning(s)\n"),
        "{out}"
    );

    let o = portico(&["check", "--deny-warnings", "warns.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("[unused]"));
}

#[test]
fn check_exits_one_on_errors_and_reports_every_one() {
    let f = Files::new();
    f.write("broken.policy", BROKEN);
    f.write("clean.policy", CLEAN);
    let o = portico(&["check", "clean.policy", "broken.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(
        out.contains("broken.policy:5:9: error: backend `ap` is not defined [undefined-name]"),
        "{out}"
    );
    assert!(
        out.contains(
            "broken.policy:6:11: error: unknown setting `tll` in `cache` [unknown-setting]"
        ),
        "{out}"
    );
    assert!(out.contains("help: did you mean `app`?"), "{out}");
    assert!(
        out.ends_with("2 file(s) checked: 2 error(s), 1 warning(s)\n"),
        "{out}"
    );
}

#[test]
fn check_exits_one_on_a_syntax_error_and_a_missing_file() {
    let f = Files::new();
    f.write("syntax.policy", "rule default {\n  route\n}\n");
    let o = portico(&["check", "syntax.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("[syntax]"), "{}", stdout(&o));

    let o = portico(&["check", "nowhere.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("nowhere.policy: cannot read"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn check_json_has_file_line_column_severity_and_message() {
    let f = Files::new();
    f.write("broken.policy", BROKEN);
    f.write("warns.policy", WARNS);
    let o = portico(
        &["check", "--format", "json", "broken.policy", "warns.policy"],
        f.dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    let diags = v["diagnostics"].as_array().expect("a diagnostics array");
    assert_eq!(diags.len(), 4, "{v:#}");
    let find = |code: &str| {
        diags
            .iter()
            .find(|d| d["code"] == code)
            .unwrap_or_else(|| panic!("no {code} in {v:#}"))
    };
    let undefined = find("undefined-name");
    assert_eq!(undefined["file"], "broken.policy");
    assert_eq!(undefined["line"], 5);
    assert_eq!(undefined["column"], 9);
    assert_eq!(undefined["severity"], "error");
    assert_eq!(undefined["message"], "backend `ap` is not defined");
    assert_eq!(undefined["help"], "did you mean `app`?");
    let unused: Vec<_> = diags.iter().filter(|d| d["code"] == "unused").collect();
    assert_eq!(unused.len(), 2, "{v:#}");
    assert!(unused.iter().all(|d| d["severity"] == "warning"));
    assert!(unused
        .iter()
        .any(|d| d["file"] == "warns.policy" && d["line"] == 5 && d["column"] == 9));

    f.write("clean.policy", CLEAN);
    let o = portico(&["check", "--format", "json", "clean.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert_eq!(v["diagnostics"], serde_json::json!([]));
}

#[test]
fn explain_shows_rule_line_backend_key_and_ttl() {
    let f = Files::new();
    f.write("clean.policy", CLEAN);
    let o = portico(
        &[
            "explain",
            "clean.policy",
            "--request",
            "GET https://example.com/assets/app.css?v=2",
            "-H",
            "Accept: text/css",
            "--client-ip",
            "192.0.2.1",
        ],
        f.dir.path(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(
        out.contains("request: GET https://example.com/assets/app.css?v=2"),
        "{out}"
    );
    assert!(out.contains("rule:    assets (clean.policy:6)"), "{out}");
    assert!(
        out.contains(
            "outcome: route to backend `app` [127.0.0.1:3000 weight 1] balance round_robin"
        ),
        "{out}"
    );
    assert!(
        out.contains("cache:   key \"example.com/assets/app.css\"\n         ttl 1d,"),
        "{out}"
    );

    let o = portico(
        &[
            "explain",
            "clean.policy",
            "--request",
            "POST https://example.com/form",
        ],
        f.dir.path(),
    );
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out.contains("rule:    default (clean.policy:14)"), "{out}");
    assert!(out.contains("cache:   off (bypass)"), "{out}");
}

#[test]
fn explain_exits_one_on_a_bad_request_line_or_header() {
    let f = Files::new();
    f.write("clean.policy", CLEAN);
    let o = portico(
        &["explain", "clean.policy", "--request", "GET"],
        f.dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).starts_with("--request: "), "{}", stdout(&o));

    let o = portico(
        &["explain", "clean.policy", "--request", "GET example.com/"],
        f.dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("not an absolute http:// or https:// URL"),
        "{}",
        stdout(&o)
    );

    let o = portico(
        &[
            "explain",
            "clean.policy",
            "--request",
            "GET https://example.com/",
            "-H",
            "no colon",
        ],
        f.dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));

    f.write("broken.policy", BROKEN);
    let o = portico(
        &[
            "explain",
            "broken.policy",
            "--request",
            "GET https://example.com/",
        ],
        f.dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("[undefined-name]"), "{}", stdout(&o));
}

#[test]
fn test_exits_zero_when_every_test_passes() {
    let f = Files::new();
    f.write("clean.policy", CLEAN);
    let o = portico(&["test", "clean.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(
        stdout(&o),
        "ok   clean.policy:18 assets are cached a day\n1 passed, 0 failed\n"
    );
}

#[test]
fn test_exits_one_and_names_what_differed() {
    let f = Files::new();
    f.write("failing.policy", FAILING);
    let o = portico(&["test", "failing.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_eq!(
        stdout(&o),
        "ok   failing.policy:9 passes\n\
         FAIL failing.policy:13 wrong ttl\n     \
         line 15: expected ttl 10m, got 5m\n\
         1 passed, 1 failed\n"
    );
}

#[test]
fn test_exits_one_when_a_policy_does_not_load() {
    let f = Files::new();
    f.write("broken.policy", BROKEN);
    f.write("clean.policy", CLEAN);
    let o = portico(&["test", "clean.policy", "broken.policy"], f.dir.path());
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("[undefined-name]"), "{out}");
    assert!(out.ends_with("1 passed, 0 failed\n"), "{out}");
}

#[test]
fn the_shipped_policies_pass_check_and_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = [
        "policies/builtin.policy",
        "policies/static-site.policy",
        "policies/api-gateway.policy",
        "policies/cms.policy",
    ];
    let mut args = vec!["check", "--deny-warnings"];
    args.extend(files);
    let o = portico(&args, root);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let mut args = vec!["test"];
    args.extend(files);
    let o = portico(&args, root);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).ends_with(" 0 failed\n"), "{}", stdout(&o));
}
