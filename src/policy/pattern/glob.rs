//! Globs matched directly, without a regex engine.
//!
//! A glob (`*` any run of characters but `/`, `**` any run, `?` one
//! character but `/`) matches exactly what its regex translation
//! ([`super::glob_to_regex`]) matches; `**` translates to `.*`, which stops at
//! a newline, and so does `**` here.
//!
//! A glob is a head, then stars each followed by a segment; the segments hold
//! literal text and `?` only, so each matches a fixed number of characters at
//! a given place. The head is matched at the start of the text and the last
//! segment at its end; with one star, what lies between only has to be free
//! of the characters the star excludes. With more stars, the segments between
//! are placed by a sweep over the positions each can start at, so a match
//! costs at most the text's length times the glob's.

/// A compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    head: Segment,
    /// Each star with the segment after it; the last segment is matched at
    /// the end of the text.
    stars: Vec<(Star, Segment)>,
}

/// A run of wildcard characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Star {
    /// `*`: any run without `/`.
    Single,
    /// `**`: any run without a newline (as the regex `.*`).
    Double,
}

impl Star {
    #[inline]
    fn excludes(self) -> char {
        match self {
            Star::Single => '/',
            Star::Double => '\n',
        }
    }
}

/// Literal text and `?`s: a fixed number of characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Segment {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Box<str>),
    /// `?`: one character but `/`.
    One,
}

impl Segment {
    fn push_char(&mut self, c: char) {
        match self.pieces.last_mut() {
            Some(Piece::Text(t)) => {
                let mut s = std::mem::take(t).into_string();
                s.push(c);
                *t = s.into_boxed_str();
            }
            _ => self
                .pieces
                .push(Piece::Text(c.to_string().into_boxed_str())),
        }
    }

    /// Where the segment ends when it starts at byte `at` of `text`.
    #[inline]
    fn match_at(&self, text: &str, at: usize) -> Option<usize> {
        let mut pos = at;
        for piece in &self.pieces {
            let rest = &text[pos..];
            match piece {
                Piece::Text(t) if rest.starts_with(&**t) => pos += t.len(),
                Piece::One => match rest.chars().next() {
                    Some(c) if c != '/' => pos += c.len_utf8(),
                    _ => return None,
                },
                Piece::Text(_) => return None,
            }
        }
        Some(pos)
    }

    /// Where the segment starts when it ends the text.
    #[inline]
    fn match_end(&self, text: &str) -> Option<usize> {
        let mut end = text.len();
        for piece in self.pieces.iter().rev() {
            let rest = &text[..end];
            match piece {
                Piece::Text(t) if rest.ends_with(&**t) => end -= t.len(),
                Piece::One => match rest.chars().next_back() {
                    Some(c) if c != '/' => end -= c.len_utf8(),
                    _ => return None,
                },
                Piece::Text(_) => return None,
            }
        }
        Some(end)
    }

    fn leading_text(&self) -> &str {
        match self.pieces.first() {
            Some(Piece::Text(t)) => t,
            _ => "",
        }
    }

    fn trailing_text(&self) -> &str {
        match self.pieces.last() {
            Some(Piece::Text(t)) => t,
            _ => "",
        }
    }
}

impl Glob {
    /// Compiles a glob; every text is a glob.
    pub fn new(glob: &str) -> Glob {
        let mut head = Segment::default();
        let mut stars: Vec<(Star, Segment)> = vec![];
        let mut chars = glob.chars().peekable();
        while let Some(c) = chars.next() {
            let segment = match stars.last_mut() {
                Some((_, s)) => s,
                None => &mut head,
            };
            match c {
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    stars.push((Star::Double, Segment::default()));
                }
                '*' => stars.push((Star::Single, Segment::default())),
                '?' => segment.pieces.push(Piece::One),
                other => segment.push_char(other),
            }
        }
        Glob { head, stars }
    }

    /// The literal text every match starts with (empty when it starts with a wildcard).
    pub fn literal_prefix(&self) -> &str {
        self.head.leading_text()
    }

    /// The literal text every match ends with (empty when it ends with a wildcard).
    pub fn literal_suffix(&self) -> &str {
        match self.stars.last() {
            Some((_, tail)) => tail.trailing_text(),
            None => self.head.trailing_text(),
        }
    }

    /// Whether the whole of `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        let Some(start) = self.head.match_at(text, 0) else {
            return false;
        };
        let Some(((last, tail), middle)) = self.stars.split_last() else {
            return start == text.len();
        };
        let Some(end) = tail.match_end(text) else {
            return false;
        };
        if end < start {
            return false;
        }
        let gap = &text[start..end];
        if middle.is_empty() {
            return !gap.contains(last.excludes());
        }
        middle_matches(middle, *last, gap)
    }
}

/// Whether `gap` matches the stars and segments of `middle` then the star `last`.
fn middle_matches(middle: &[(Star, Segment)], last: Star, gap: &str) -> bool {
    // reach[p]: the stars and segments so far can match gap[..p].
    let mut reach = vec![false; gap.len() + 1];
    let mut next = vec![false; gap.len() + 1];
    reach[0] = true;
    let positions = || {
        gap.char_indices()
            .map(|(i, c)| (i, Some(c)))
            .chain(std::iter::once((gap.len(), None)))
    };
    for (star, segment) in middle {
        next.fill(false);
        let mut any = false;
        // Whether some reached position has only characters the star allows since.
        let mut open = false;
        for (p, c) in positions() {
            open |= reach[p];
            if open {
                if let Some(q) = segment.match_at(gap, p) {
                    next[q] = true;
                    any = true;
                }
            }
            if c == Some(star.excludes()) {
                open = false;
            }
        }
        if !any {
            return false;
        }
        std::mem::swap(&mut reach, &mut next);
    }
    let mut open = false;
    for (p, c) in positions() {
        open |= reach[p];
        if c == Some(last.excludes()) {
            open = false;
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::super::{glob_to_regex, texts_of};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn globs_match_whole_texts() {
        let cases: &[(&str, &str, bool)] = &[
            ("/static/*.css", "/static/a.css", true),
            ("/static/*.css", "/static/a/b.css", false),
            ("/static/*.css", "/static/.css", true),
            ("/img/**", "/img/a/b.png", true),
            ("/img/**", "/img", false),
            ("/a?c", "/abc", true),
            ("/a?c", "/a/c", false),
            ("/a?c", "/aéc", true),
            ("/exact", "/exact", true),
            ("/exact", "/exact/", false),
            ("", "", true),
            ("", "/", false),
            ("/**/*.css", "/a/b/c.css", true),
            ("/**/*.css", "/c.css", false),
            ("/**/*.css", "//c.css", true),
            ("**a*b", "a/ab", true),
            ("*a*b", "a/ab", false),
            ("/api/*/users", "/api/v1/users", true),
            ("/api/*/users", "/api/v1/x/users", false),
            ("/**", "/a\nb", false),
            ("/*", "/a\nb", true),
            ("ab*ba", "aba", false),
        ];
        for &(glob, text, want) in cases {
            assert_eq!(Glob::new(glob).is_match(text), want, "{glob:?} on {text:?}");
        }
    }

    #[test]
    fn globs_know_their_literal_ends() {
        let g = Glob::new("/static/*.css");
        assert_eq!(
            (g.literal_prefix(), g.literal_suffix()),
            ("/static/", ".css")
        );
        let g = Glob::new("*.css");
        assert_eq!((g.literal_prefix(), g.literal_suffix()), ("", ".css"));
        let g = Glob::new("/a?c");
        assert_eq!((g.literal_prefix(), g.literal_suffix()), ("/a", "c"));
    }

    fn glob_text() -> impl Strategy<Value = String> {
        texts_of(&["a", "b", "/", ".", "é", "\n", "*", "**", "?"], 8)
    }

    fn text() -> impl Strategy<Value = String> {
        texts_of(&["a", "b", "/", ".", "é", "\n", "*", "?"], 10)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// The glob matcher answers as the regex translation of the glob does.
        #[test]
        fn globs_match_as_their_regex_translation(
            glob in glob_text(),
            texts in proptest::collection::vec(text(), 16),
        ) {
            let re = regex::Regex::new(&glob_to_regex(&glob)).expect("translations are regexes");
            let g = Glob::new(&glob);
            for text in &texts {
                prop_assert_eq!(g.is_match(text), re.is_match(text), "{:?} on {:?}", glob, text);
            }
        }

        /// The literal ends are those the regex translation gives the tree.
        #[test]
        fn glob_literals_are_those_of_the_translation(glob in glob_text()) {
            let g = Glob::new(&glob);
            let (prefix, suffix) = super::super::anchored_literals(&glob_to_regex(&glob));
            prop_assert_eq!(g.literal_prefix(), prefix.as_deref().unwrap_or(""));
            if g.literal_prefix().is_empty() {
                prop_assert_eq!(g.literal_suffix(), suffix.as_deref().unwrap_or(""));
            }
        }
    }
}
