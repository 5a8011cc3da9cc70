//! The command line: `run`, `check`, `explain`, `test` and `demo`.
//!
//! The language tools print to stdout and return an exit code; they are the
//! only place in Portico that prints directly (everything else logs through
//! `tracing`).

use crate::policy::{self, diag::Severity, testing};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "portico",
    version,
    about = "A caching web accelerator driven by a checked policy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check policy files: syntax, names, kinds, shadowed rules, unsafe caching.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Treat warnings as failures.
        #[arg(long)]
        deny_warnings: bool,
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
    },
    /// Show what a policy decides for one request, and why.
    Explain {
        file: PathBuf,
        /// The request, as "METHOD URL", e.g. "GET https://shop.example/app.css?v=3".
        #[arg(long)]
        request: String,
        /// A request header, "Name: value" (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The client's IP address.
        #[arg(long)]
        client_ip: Option<String>,
    },
    /// Run the `test` blocks of policy files.
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run the proxy.
    Run(RunArgs),
    /// Start a slow origin and Portico in front of it, and show the difference.
    Demo,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The policy file. Without it, `-b` runs the built-in policy.
    pub policy: Option<PathBuf>,
    /// Run the built-in policy with this one backend server (HOST:PORT).
    #[arg(short = 'b', long = "backend", conflicts_with = "policy")]
    pub backend: Option<String>,
    /// Listen on this address (repeatable); replaces the policy's plain listeners.
    #[arg(long)]
    pub listen: Vec<String>,
    /// The admin listener's address.
    #[arg(long)]
    pub admin: Option<String>,
    /// The admin token.
    #[arg(long, env = "PORTICO_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The disk cache directory.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Access log format.
    #[arg(long, value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn read(path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// `portico check`: 0 when clean or only warnings (unless denied), 1 otherwise.
pub fn check(files: &[PathBuf], deny_warnings: bool, format: Format) -> i32 {
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    let mut json = vec![];
    let (mut errors, mut warnings) = (0, 0);
    for path in files {
        let text = match read(path) {
            Ok(t) => t,
            Err(e) => {
                failed = true;
                errors += 1;
                match format {
                    Format::Human => {
                        let _ = writeln!(out, "{e}");
                    }
                    Format::Json => json.push(serde_json::json!({
                        "file": path.display().to_string(), "line": 0, "column": 0,
                        "severity": "error", "code": "io", "message": e,
                    })),
                }
                continue;
            }
        };
        let name = path.display().to_string();
        let (source, _, diags) = policy::check_text(&text, &name);
        for d in &diags {
            match d.severity {
                Severity::Error => errors += 1,
                Severity::Warning => warnings += 1,
            }
            failed |= d.is_error() || deny_warnings;
            match format {
                Format::Human => {
                    let _ = writeln!(out, "{}", source.render(d));
                }
                Format::Json => json.push(source.to_json(d)),
            }
        }
    }
    match format {
        Format::Human => {
            let _ = writeln!(
                out,
                "{} file(s) checked: {errors} error(s), {warnings} warning(s)",
                files.len()
            );
        }
        Format::Json => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "diagnostics": json }))
                    .unwrap_or_default()
            );
        }
    }
    i32::from(failed)
}

fn load_or_print(path: &PathBuf) -> Option<policy::Policy> {
    let text = match read(path) {
        Ok(t) => t,
        Err(e) => {
            println!("{e}");
            return None;
        }
    };
    match policy::load(&text, &path.display().to_string()) {
        Ok(p) => Some(p),
        Err(e) => {
            println!("{e}");
            None
        }
    }
}

/// `portico explain`.
pub fn explain(file: &PathBuf, request: &str, headers: &[String], client_ip: Option<&str>) -> i32 {
    let Some(policy) = load_or_print(file) else {
        return 1;
    };
    let mut pairs = vec![];
    for h in headers {
        match h.split_once(':') {
            Some((n, v)) => pairs.push((n.trim().to_string(), v.trim().to_string())),
            None => {
                println!("-H {h:?}: expected \"Name: value\"");
                return 1;
            }
        }
    }
    match testing::OwnedRequest::from_line(request, &pairs, client_ip) {
        Ok(req) => {
            print!("{}", testing::explain(&policy, &req));
            0
        }
        Err(e) => {
            println!("--request: {e}");
            1
        }
    }
}

/// `portico test`: 0 when every test passes.
pub fn test(files: &[PathBuf]) -> i32 {
    let (mut passed, mut failed) = (0, 0);
    let mut broken = false;
    for path in files {
        let Some(policy) = load_or_print(path) else {
            broken = true;
            continue;
        };
        for r in testing::run_tests(&policy) {
            if r.passed() {
                passed += 1;
                println!("ok   {}:{} {}", path.display(), r.line, r.name);
            } else {
                failed += 1;
                println!("FAIL {}:{} {}", path.display(), r.line, r.name);
                for f in &r.failures {
                    println!("     {f}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    i32::from(failed > 0 || broken)
}
