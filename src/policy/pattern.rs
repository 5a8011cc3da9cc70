//! Regexes and globs in policies: compiled once at load time, with the
//! literal text every match starts or ends with, which the decision tree uses
//! to place the rule (see `compile`).
//!
//! Every pattern is matched by the cheapest matcher that gives exactly the
//! regex's answer:
//!
//! - a regex that is only literal text, bare or anchored (`\.css$`,
//!   `^/health$`, `^/api/`), is compared as text: policies are full of them,
//!   and building a regex engine for each is most of the cost of loading a
//!   large policy. It is still parsed as a regex first, so invalid ones are
//!   reported as before;
//! - a case-sensitive glob is matched by [`Glob`], in time linear in the text
//!   for the usual one-star globs and at worst proportional to the text times
//!   the glob;
//! - everything else runs on regex-automata's meta engine.
//!
//! A glob keeps its translation into a regex ([`glob_to_regex`]) as its
//! source text, so that [`Pattern::as_str`] is always a regex with the same
//! matches (the tree combines the regexes of one leaf into a `RegexSet`).

mod glob;

pub use glob::Glob;
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{Hir, HirKind, Look};
use std::sync::Arc;

/// A compiled regex or glob with its source text and anchored literals.
///
/// Cloning is cheap: the compiled matcher is shared.
#[derive(Clone)]
pub struct Pattern {
    source: Arc<str>,
    matcher: Matcher,
    prefix: Option<Arc<str>>,
    suffix: Option<Arc<str>>,
}

#[derive(Clone)]
enum Matcher {
    /// A regex that is only literal text.
    Literal(Arc<str>, Anchors),
    /// A case-sensitive glob.
    Glob(Arc<Glob>),
    /// Any other regex, on the meta engine without its full DFA: a policy may
    /// hold thousands of regexes, and building a full DFA for each costs far
    /// more at load time than it saves per request over the lazy DFA.
    Regex(Arc<regex_automata::meta::Regex>),
}

/// Where a literal regex is anchored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Anchors {
    /// `lit`: anywhere in the text.
    None,
    /// `^lit`.
    Start,
    /// `lit$`.
    End,
    /// `^lit$`: the whole text.
    Both,
}

/// Why a regex was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// The text is not a regex; the parser's explanation.
    Syntax(String),
    /// The compiled program would exceed the size limit.
    TooBig,
    Other(String),
}

impl Pattern {
    /// Parses and compiles the regex `source`; `size_limit` bounds the
    /// compiled program in bytes (a literal regex needs no program).
    pub fn new(
        source: &str,
        case_insensitive: bool,
        size_limit: usize,
    ) -> Result<Pattern, PatternError> {
        let hir = regex_syntax::ParserBuilder::new()
            .case_insensitive(case_insensitive)
            .nest_limit(64)
            .build()
            .parse(source)
            .map_err(|e| PatternError::Syntax(e.to_string()))?;
        let (prefix, suffix) = literals_of(&hir);
        let matcher = match literal_of(&hir) {
            Some((text, anchors)) => Matcher::Literal(text.into(), anchors),
            None => Matcher::Regex(Arc::new(
                regex_automata::meta::Builder::new()
                    .configure(
                        regex_automata::meta::Config::new()
                            .dfa(false)
                            // Only is_match is asked: the one-pass DFA serves capture groups.
                            .onepass(false)
                            .nfa_size_limit(Some(size_limit)),
                    )
                    .build_from_hir(&hir)
                    .map_err(|e| match e.size_limit() {
                        Some(_) => PatternError::TooBig,
                        None => PatternError::Other(e.to_string()),
                    })?,
            )),
        };
        Ok(Pattern {
            source: source.into(),
            matcher,
            prefix: prefix.map(Arc::from),
            suffix: suffix.map(Arc::from),
        })
    }

    /// Compiles a glob (`*` any run but `/`, `**` any run, `?` one character
    /// but `/`), matching whole texts. A case-insensitive glob is compiled as
    /// its regex translation, under `size_limit`; a case-sensitive one never fails.
    pub fn glob(
        glob: &str,
        case_insensitive: bool,
        size_limit: usize,
    ) -> Result<Pattern, PatternError> {
        let source = glob_to_regex(glob);
        if case_insensitive {
            return Pattern::new(&source, true, size_limit);
        }
        let glob = Glob::new(glob);
        let prefix = glob.literal_prefix();
        // As for regexes, the suffix is only kept when there is no prefix.
        let suffix = prefix.is_empty().then(|| glob.literal_suffix());
        Ok(Pattern {
            source: source.into(),
            prefix: Some(prefix.into()),
            suffix: suffix.map(Arc::from),
            matcher: Matcher::Glob(Arc::new(glob)),
        })
    }

    #[inline]
    pub fn is_match(&self, haystack: &str) -> bool {
        match &self.matcher {
            Matcher::Literal(text, anchors) => match anchors {
                Anchors::Both => haystack == &**text,
                Anchors::Start => haystack.starts_with(&**text),
                Anchors::End => haystack.ends_with(&**text),
                Anchors::None => haystack.contains(&**text),
            },
            Matcher::Glob(glob) => glob.is_match(haystack),
            Matcher::Regex(re) => re.is_match(haystack),
        }
    }

    /// The source text: the regex, or a glob's translation into one.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The text every match starts with, when the pattern is anchored at the start.
    pub fn anchored_prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// The text every match ends with, when the pattern is anchored at the end
    /// and has no anchored prefix.
    pub fn anchored_suffix(&self) -> Option<&str> {
        self.suffix.as_deref()
    }
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}/", self.source)
    }
}

/// Translates a glob (`*` any run but `/`, `**` any run, `?` one character) into an anchored regex.
pub fn glob_to_regex(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() + 8);
    out.push('^');
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                out.push_str(".*");
            }
            '*' => out.push_str("[^/]*"),
            '?' => out.push_str("[^/]"),
            other => {
                let mut buf = [0; 4];
                out.push_str(&regex::escape(other.encode_utf8(&mut buf)));
            }
        }
    }
    out.push('$');
    out
}

/// The text of a regex that is only a literal, bare or between `^` and `$`
/// (not their multi-line forms), and where it is anchored.
fn literal_of(hir: &Hir) -> Option<(String, Anchors)> {
    let parts = match hir.kind() {
        HirKind::Concat(parts) => parts.as_slice(),
        _ => std::slice::from_ref(hir),
    };
    let (start, parts) = match parts.split_first() {
        Some((first, rest)) if *first.kind() == HirKind::Look(Look::Start) => (true, rest),
        _ => (false, parts),
    };
    let (end, parts) = match parts.split_last() {
        Some((last, rest)) if *last.kind() == HirKind::Look(Look::End) => (true, rest),
        _ => (false, parts),
    };
    let text = match parts {
        [] => "",
        [one] => match one.kind() {
            HirKind::Literal(lit) => std::str::from_utf8(&lit.0).ok()?,
            HirKind::Empty => "",
            _ => return None,
        },
        _ => return None,
    };
    let anchors = match (start, end) {
        (true, true) => Anchors::Both,
        (true, false) => Anchors::Start,
        (false, true) => Anchors::End,
        (false, false) => Anchors::None,
    };
    Some((text.to_string(), anchors))
}

/// The literal prefix of a start-anchored regex, and, when it has none, the
/// literal suffix of an end-anchored one.
pub fn anchored_literals(pattern: &str) -> (Option<String>, Option<String>) {
    match regex_syntax::ParserBuilder::new().build().parse(pattern) {
        Ok(hir) => literals_of(&hir),
        Err(_) => (None, None),
    }
}

fn literals_of(hir: &Hir) -> (Option<String>, Option<String>) {
    let props = hir.properties();
    let literal = |kind: ExtractKind| {
        let seq = Extractor::new().kind(kind.clone()).extract(hir);
        let common = match kind {
            ExtractKind::Prefix => seq.longest_common_prefix(),
            _ => seq.longest_common_suffix(),
        }?;
        std::str::from_utf8(common).ok().map(str::to_string)
    };
    let prefix = if props.look_set_prefix().contains(Look::Start) {
        literal(ExtractKind::Prefix)
    } else {
        None
    };
    // The suffix is only needed when there is no prefix to place the rule by.
    let suffix = if prefix.as_deref().is_none_or(str::is_empty)
        && props.look_set_suffix().contains(Look::End)
    {
        literal(ExtractKind::Suffix)
    } else {
        None
    };
    (prefix, suffix)
}

/// Texts of up to `max - 1` pieces drawn from `pieces`, for property tests.
#[cfg(test)]
pub(crate) fn texts_of(
    pieces: &'static [&'static str],
    max: usize,
) -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::strategy::Strategy as _;
    proptest::collection::vec(proptest::sample::select(pieces), 0..max)
        .prop_map(|parts| parts.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn patterns_keep_their_literals() {
        let p = Pattern::new(r"^/api/v[0-9]+/", false, 1 << 20).unwrap();
        assert_eq!(p.anchored_prefix(), Some("/api/v"));
        assert!(p.is_match("/api/v2/x"));
        let s = Pattern::new(r"\.css$", false, 1 << 20).unwrap();
        assert_eq!(s.anchored_prefix(), None);
        assert_eq!(s.anchored_suffix(), Some(".css"));
        assert!(matches!(
            Pattern::new("(", false, 1 << 20),
            Err(PatternError::Syntax(_))
        ));
        assert_eq!(
            Pattern::new("[a-z]{1000}{1000}", false, 1 << 20).err(),
            Some(PatternError::TooBig)
        );
        let ci = Pattern::new("^ab$", true, 1 << 20).unwrap();
        assert!(ci.is_match("AB"));
    }

    fn is_literal(source: &str) -> Option<Anchors> {
        match Pattern::new(source, false, 1 << 20).unwrap().matcher {
            Matcher::Literal(_, anchors) => Some(anchors),
            _ => None,
        }
    }

    #[test]
    fn literal_regexes_are_compared_as_text() {
        assert_eq!(is_literal(r"\.css$"), Some(Anchors::End));
        assert_eq!(is_literal(r"^/health$"), Some(Anchors::Both));
        assert_eq!(is_literal(r"^/api/"), Some(Anchors::Start));
        assert_eq!(is_literal(r"admin"), Some(Anchors::None));
        assert_eq!(is_literal(r"^$"), Some(Anchors::Both));
        assert_eq!(is_literal(r""), Some(Anchors::None));
        // Line anchors, classes, groups and case folding need the regex engine.
        assert_eq!(is_literal(r"(?m)^/a$"), None);
        assert_eq!(is_literal(r"^/a[bc]"), None);
        assert_eq!(is_literal(r"^(/a)$"), None);
        assert_eq!(is_literal(r"(?i)^/a$"), None);
        assert_eq!(is_literal(r"^/a$|^/b$"), None);
        let p = Pattern::new(r"\.ext12$", false, 1 << 20).unwrap();
        assert!(p.is_match("/f.ext12"));
        assert!(!p.is_match("/f.ext123"));
        assert!(!p.is_match("/f.ext12/x"));
        // The source is still checked as a regex.
        assert!(matches!(
            Pattern::new(r"\.ext(", false, 1 << 20),
            Err(PatternError::Syntax(_))
        ));
    }

    #[test]
    fn globs_keep_a_regex_source_and_literals() {
        let g = Pattern::glob("/static/*.css", false, 1 << 20).unwrap();
        assert_eq!(g.as_str(), r"^/static/[^/]*\.css$");
        assert_eq!(g.anchored_prefix(), Some("/static/"));
        assert_eq!(g.anchored_suffix(), None);
        assert!(g.is_match("/static/a.css"));
        assert!(!g.is_match("/static/a/b.css"));
        let s = Pattern::glob("**.png", false, 1 << 20).unwrap();
        assert_eq!(s.anchored_suffix(), Some(".png"));
        assert!(s.is_match("/img/a/b.png"));
        let ci = Pattern::glob("*.EXAMPLE.com", true, 1 << 20).unwrap();
        assert!(ci.is_match("www.example.COM"));
        assert!(!ci.is_match("a.b/example.com"));
    }

    /// Regex-like texts over a small alphabet, anchors and escapes included.
    fn regex_text() -> impl Strategy<Value = String> {
        texts_of(
            &[
                "a", "b", "/", r"\.", ".", "^", "$", "é", "(?m)", "[ab]", "b*",
            ],
            6,
        )
    }

    fn haystack() -> impl Strategy<Value = String> {
        texts_of(&["a", "b", "/", ".", "é", "\n"], 8)
    }

    proptest! {
        /// Whichever matcher a regex gets, it answers as the regex crate does.
        #[test]
        fn patterns_match_as_the_regex_does(
            source in regex_text(),
            texts in proptest::collection::vec(haystack(), 8),
        ) {
            let Ok(re) = regex::Regex::new(&source) else { return Ok(()) };
            let p = Pattern::new(&source, false, 1 << 20).expect("the regex crate accepts it");
            for text in &texts {
                prop_assert_eq!(p.is_match(text), re.is_match(text), "{:?} on {:?}", source, text);
            }
        }
    }
}
