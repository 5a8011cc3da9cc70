//! Regexes in policies: compiled once at load time, with the literal text
//! every match starts or ends with, which the decision tree uses to place
//! the rule (see `compile`).

use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{Hir, Look};
use std::sync::Arc;

/// A compiled regex with its source text and anchored literals.
///
/// Built with regex-automata's meta engine without its full DFA: a policy
/// may hold thousands of regexes, and building a full DFA for each costs far
/// more at load time than it saves per request over the lazy DFA.
#[derive(Clone)]
pub struct Pattern {
    source: Arc<str>,
    re: regex_automata::meta::Regex,
    prefix: Option<Arc<str>>,
    suffix: Option<Arc<str>>,
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
    /// Parses and compiles `source`; `size_limit` bounds the compiled program in bytes.
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
        let re = regex_automata::meta::Builder::new()
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
            })?;
        Ok(Pattern {
            source: source.into(),
            re,
            prefix: prefix.map(Arc::from),
            suffix: suffix.map(Arc::from),
        })
    }

    #[inline]
    pub fn is_match(&self, haystack: &str) -> bool {
        self.re.is_match(haystack)
    }

    /// The source text.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The text every match starts with, when the regex is anchored at the start.
    pub fn anchored_prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// The text every match ends with, when the regex is anchored at the end
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
