//! Diagnostics: what the parser and the checker report, and how it is shown.
//!
//! A diagnostic carries a severity, a stable code, the span it is about, a
//! message and an optional hint. It renders as
//!
//! ```text
//! site.policy:12:9: error: backend `ap` is not defined [undefined-name]
//!    |
//! 12 |   route ap
//!    |         ^^ help: did you mean `app`?
//! ```
//!
//! or as JSON for editors and CI.

use super::ast::Span;
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One finding about a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable identifier, such as `undefined-name`.
    pub code: &'static str,
    pub span: Span,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            span,
            message: message.into(),
            help: None,
        }
    }

    pub fn warning(code: &'static str, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, span, message)
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// A policy's text with its name, able to turn byte offsets into lines and columns.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
    line_starts: Vec<usize>,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Source {
        let text = text.into();
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Source {
            name: name.into(),
            text,
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        // A span may end inside a multi-byte character; count from its start.
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self.text[start..offset].chars().count() + 1;
        (line + 1, col)
    }

    /// The text of a 1-based line, without its newline.
    pub fn line_text(&self, line: usize) -> &str {
        let start = self.line_starts[line - 1];
        let end = self
            .line_starts
            .get(line)
            .map(|&e| e - 1)
            .unwrap_or(self.text.len());
        self.text[start..end].trim_end_matches('\r')
    }

    /// Renders one diagnostic in the human format, with the source line and a caret.
    pub fn render(&self, d: &Diagnostic) -> String {
        let (line, col) = self.line_col(d.span.start);
        let mut out = format!(
            "{}:{}:{}: {}: {} [{}]\n",
            self.name,
            line,
            col,
            d.severity.as_str(),
            d.message,
            d.code
        );
        let text = self.line_text(line);
        let gutter = line.to_string().len();
        let pad = " ".repeat(gutter);
        // The caret covers the span on its first line, at least one column.
        let (end_line, end_col) = self.line_col(d.span.end);
        let width = if end_line == line {
            end_col.saturating_sub(col).max(1)
        } else {
            (text.chars().count() + 1).saturating_sub(col).max(1)
        };
        let _ = writeln!(out, "{pad} |");
        let _ = writeln!(out, "{line} | {text}");
        let _ = write!(out, "{pad} | {}{}", " ".repeat(col - 1), "^".repeat(width));
        if let Some(help) = &d.help {
            let _ = write!(out, " help: {help}");
        }
        out.push('\n');
        out
    }

    /// Renders all diagnostics, separated by blank lines.
    pub fn render_all(&self, diags: &[Diagnostic]) -> String {
        diags
            .iter()
            .map(|d| self.render(d))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The machine-readable form of one diagnostic.
    pub fn to_json(&self, d: &Diagnostic) -> serde_json::Value {
        let (line, column) = self.line_col(d.span.start);
        let (end_line, end_column) = self.line_col(d.span.end);
        serde_json::json!({
            "file": self.name,
            "line": line,
            "column": column,
            "end_line": end_line,
            "end_column": end_column,
            "severity": d.severity,
            "code": d.code,
            "message": d.message,
            "help": d.help,
        })
    }
}

/// The closest of `candidates` to `name`, if it is close enough to be a likely typo.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        let s = Source::new("a", "ab\n\u{e9}cd\n");
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(3), (2, 1));
        assert_eq!(s.line_col(5), (2, 2));
        assert_eq!(s.line_text(2), "\u{e9}cd");
    }

    #[test]
    fn offsets_inside_a_character_do_not_panic() {
        let s = Source::new("a", "x \u{664}y");
        // Byte 3 is inside the two-byte character.
        assert_eq!(s.line_col(3), (1, 3));
        let d = Diagnostic::error("syntax", Span::new(2, 3), "bad");
        assert!(s.render(&d).contains("^"));
    }

    #[test]
    fn renders_caret_under_span() {
        let s = Source::new("site.policy", "rule a {\n  route ap\n}\n");
        let d = Diagnostic::error(
            "undefined-name",
            Span::new(17, 19),
            "backend `ap` is not defined",
        )
        .with_help("did you mean `app`?");
        assert_eq!(
            s.render(&d),
            "site.policy:2:9: error: backend `ap` is not defined [undefined-name]\n  |\n2 |   route ap\n  |         ^^ help: did you mean `app`?\n"
        );
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(suggest("ap", ["app", "api_v2"]), Some("app"));
        assert_eq!(suggest("zzz", ["app"]), None);
    }
}
