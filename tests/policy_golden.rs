//! Golden tests of the policy language.
//!
//! - `tests/golden/bad/*.policy`: each has a `.expected` file beside it with
//!   the exact rendered diagnostics of the checker.
//! - `tests/golden/good/*.policy`: each loads without errors or warnings, its
//!   test blocks pass, and its decision tree dump equals the `.tree` file.
//! - `policies/*.policy`: the shipped examples load without warnings and all
//!   their test blocks pass.
//!
//! Run with `PORTICO_BLESS=1` to rewrite the expectations from the current
//! output; without it, any difference fails.

use portico::policy::{self, testing};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn blessing() -> bool {
    std::env::var_os("PORTICO_BLESS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// The `.policy` files of a directory, sorted by name.
fn policies_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "policy"))
        .collect();
    files.sort();
    files
}

/// The name a golden file is checked under: `bad/NAME.policy`, stable across machines.
fn display_name(path: &Path) -> String {
    let dir = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = path.file_name().expect("file name").to_string_lossy();
    format!("{dir}/{file}")
}

/// Compares `actual` with the file at `expected_path`, or writes it when blessing.
/// Returns a description of the mismatch, if any.
fn compare(expected_path: &Path, actual: &str) -> Option<String> {
    if blessing() {
        std::fs::write(expected_path, actual)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        return None;
    }
    let expected = match std::fs::read_to_string(expected_path) {
        Ok(t) => t,
        Err(e) => {
            return Some(format!(
                "{}: {e} (run with PORTICO_BLESS=1 to create it)\n--- actual ---\n{actual}",
                expected_path.display()
            ))
        }
    };
    (expected != actual).then(|| {
        format!(
            "{} differs\n--- expected ---\n{expected}\n--- actual ---\n{actual}",
            expected_path.display()
        )
    })
}

fn finish(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} golden mismatch(es) (PORTICO_BLESS=1 regenerates):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn bad_policies_report_exactly_the_expected_diagnostics() {
    let files = policies_in(&root().join("tests/golden/bad"));
    assert!(files.len() >= 22, "only {} bad policies", files.len());
    let mut failures = vec![];
    let mut codes = std::collections::BTreeSet::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("readable policy");
        let (source, _, diags) = policy::check_text(&text, &display_name(path));
        if diags.is_empty() {
            failures.push(format!("{}: no diagnostics at all", path.display()));
            continue;
        }
        codes.extend(diags.iter().map(|d| d.code));
        let mut rendered = source.render_all(&diags);
        rendered.push('\n');
        if let Some(f) = compare(&path.with_extension("expected"), &rendered) {
            failures.push(f);
        }
    }
    finish(failures);
    assert!(
        codes.len() >= 22,
        "bad policies cover only {} codes: {codes:?}",
        codes.len()
    );
}

#[test]
fn good_policies_compile_to_the_expected_tree() {
    let files = policies_in(&root().join("tests/golden/good"));
    assert!(!files.is_empty(), "no good policies");
    let mut failures = vec![];
    for path in &files {
        let text = std::fs::read_to_string(path).expect("readable policy");
        let policy = match policy::load(&text, &display_name(path)) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{} does not load:\n{e}", path.display()));
                continue;
            }
        };
        if !policy.warnings.is_empty() {
            failures.push(format!(
                "{} has warnings:\n{}",
                path.display(),
                policy.source.render_all(&policy.warnings)
            ));
        }
        for r in testing::run_tests(&policy) {
            if !r.passed() {
                failures.push(format!(
                    "{}:{} test {:?} failed:\n  {}",
                    path.display(),
                    r.line,
                    r.name,
                    r.failures.join("\n  ")
                ));
            }
        }
        if let Some(f) = compare(&path.with_extension("tree"), &policy.tree.dump()) {
            failures.push(f);
        }
    }
    finish(failures);
}

#[test]
fn shipped_policies_load_cleanly_and_pass_their_tests() {
    let files = policies_in(&root().join("policies"));
    assert!(files.len() >= 4, "expected the built-in and three examples");
    let mut failures = vec![];
    for path in &files {
        let text = std::fs::read_to_string(path).expect("readable policy");
        let policy = match policy::load(&text, &path.display().to_string()) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{} does not load:\n{e}", path.display()));
                continue;
            }
        };
        if !policy.warnings.is_empty() {
            failures.push(format!(
                "{} has warnings:\n{}",
                path.display(),
                policy.source.render_all(&policy.warnings)
            ));
        }
        let results = testing::run_tests(&policy);
        if results.is_empty() {
            failures.push(format!("{} has no test blocks", path.display()));
        }
        for r in results.iter().filter(|r| !r.passed()) {
            failures.push(format!(
                "{}:{} test {:?} failed:\n  {}",
                path.display(),
                r.line,
                r.name,
                r.failures.join("\n  ")
            ));
        }
    }
    finish(failures);
}

#[test]
fn a_policy_over_the_size_limit_is_refused() {
    let text = "#".repeat(policy::parse::MAX_POLICY_BYTES + 1);
    let (source, model, diags) = policy::check_text(&text, "huge.policy");
    assert!(model.is_none());
    assert_eq!(diags.len(), 1);
    assert_eq!(diags[0].code, "too-large");
    let rendered = source.render(&diags[0]);
    let first_line = rendered.lines().next().unwrap_or_default();
    assert_eq!(
        first_line,
        format!(
            "huge.policy:1:1: error: the policy is {} bytes, more than the limit of {} bytes [too-large]",
            text.len(),
            policy::parse::MAX_POLICY_BYTES
        )
    );
}
