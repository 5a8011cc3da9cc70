//! The decision tree's node types and its stable text dump.
//!
//! Rules are indexed first by host (exact names, `.suffix` names, any host)
//! and then by path (exact paths, a byte trie of path prefixes and a byte
//! trie of reversed path suffixes). Each index
//! leaf holds a [`RuleList`]: the rules placed there, in policy order, with
//! the residual test each still needs. A request collects the lists on its
//! host and path and merges them by rule order: the first rule whose residual
//! passes wins, exactly as if the rules were tried one after another.

use super::model::Cond;
use super::model::Pattern;
use regex::RegexSet;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Index of a request rule in policy order.
pub type RuleIdx = u32;

/// What is left to test of a rule once the tree has placed it.
#[derive(Debug, Clone)]
pub struct Residual {
    /// A path regex that the tree used only as a filter (its literal prefix),
    /// still to be matched. It may be answered by the list's [`RegexSet`].
    pub path_regex: Option<Pattern>,
    /// The rest of the rule's condition.
    pub rest: Cond,
    /// True when `rest` is `Cond::True`, so evaluation can skip it.
    pub rest_is_true: bool,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub rule: RuleIdx,
    /// Position of the entry's path regex in the list's set, when the list has one.
    pub slot: Option<u32>,
}

/// Rules at one leaf of the tree, in policy order.
#[derive(Debug, Clone, Default)]
pub struct RuleList {
    pub entries: Vec<Entry>,
    /// All path regexes of the list's entries as one set, when there are
    /// enough of them that one pass beats trying them in turn.
    pub set: Option<RegexSet>,
    /// With a set: for each entry, the position of the first entry at or
    /// after it without a slot (`entries.len()` when none), so that a walk
    /// can jump over entries whose regex the set did not match.
    pub next_plain: Vec<u32>,
}

/// A byte trie node of path prefixes.
#[derive(Debug, Clone, Default)]
pub struct TrieNode {
    /// Children by next byte, sorted by byte.
    pub children: Vec<(u8, u32)>,
    pub rules: Option<RuleList>,
}

/// Rules indexed by path.
#[derive(Debug, Clone)]
pub struct PathIndex {
    pub exact: HashMap<Box<str>, RuleList>,
    /// Path prefixes. Node 0 is the root: the empty prefix, rules with no
    /// path constraint.
    pub trie: Vec<TrieNode>,
    /// Path suffixes, walked from the path's last byte backwards (the literal
    /// ends of regexes anchored with `$`, and `path $=`). Node 0 is the root
    /// and holds no rules: a rule with an empty suffix goes in `trie`.
    pub suffix_trie: Vec<TrieNode>,
}

impl Default for PathIndex {
    fn default() -> Self {
        PathIndex {
            exact: HashMap::new(),
            trie: vec![TrieNode::default()],
            suffix_trie: vec![TrieNode::default()],
        }
    }
}

/// The child of `node` for byte `b` in a trie.
#[inline]
pub fn trie_child(trie: &[TrieNode], node: u32, b: u8) -> Option<u32> {
    let children = &trie[node as usize].children;
    children
        .binary_search_by_key(&b, |(c, _)| *c)
        .ok()
        .map(|i| children[i].1)
}

impl PathIndex {
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
            && self.trie.len() == 1
            && self.trie[0].rules.is_none()
            && self.suffix_trie.len() == 1
    }

    /// The child of `node` for byte `b` in the prefix trie.
    #[inline]
    pub fn child(&self, node: u32, b: u8) -> Option<u32> {
        trie_child(&self.trie, node, b)
    }
}

/// The compiled decision tree.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// Rules for exactly one host name (lowercase).
    pub exact_hosts: HashMap<Box<str>, PathIndex>,
    /// Rules for every host ending in a `.suffix` (the key keeps its leading dot).
    pub suffix_hosts: HashMap<Box<str>, PathIndex>,
    /// Rules for any host.
    pub any_host: PathIndex,
    /// Per rule, what remains to be tested.
    pub residuals: Vec<Residual>,
    /// Rule names, for dumps and traces.
    pub names: Vec<String>,
}

impl Tree {
    /// A stable, human-readable dump of the tree, used by `explain` and tests.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        let mut hosts: Vec<_> = self.exact_hosts.iter().collect();
        hosts.sort_by(|a, b| a.0.cmp(b.0));
        for (h, idx) in hosts {
            let _ = writeln!(out, "host == {h}");
            self.dump_index(idx, &mut out);
        }
        let mut suffixes: Vec<_> = self.suffix_hosts.iter().collect();
        suffixes.sort_by(|a, b| a.0.cmp(b.0));
        for (s, idx) in suffixes {
            let _ = writeln!(out, "host $= {s}");
            self.dump_index(idx, &mut out);
        }
        if !self.any_host.is_empty() {
            let _ = writeln!(out, "any host");
            self.dump_index(&self.any_host, &mut out);
        }
        out
    }

    fn dump_list(&self, list: &RuleList, out: &mut String) {
        let names: Vec<String> = list
            .entries
            .iter()
            .map(|e| {
                let r = &self.residuals[e.rule as usize];
                let mut s = format!("#{} {}", e.rule + 1, self.names[e.rule as usize]);
                if r.path_regex.is_some() {
                    s.push_str(" (regex)");
                }
                if !r.rest_is_true {
                    s.push_str(" (test)");
                }
                s
            })
            .collect();
        let set = if list.set.is_some() {
            " [regex set]"
        } else {
            ""
        };
        let _ = writeln!(out, "{}{set}", names.join(", "));
    }

    fn dump_index(&self, idx: &PathIndex, out: &mut String) {
        let mut exact: Vec<_> = idx.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        for (p, list) in exact {
            let _ = write!(out, "  path == {p}: ");
            self.dump_list(list, out);
        }
        // Depth-first over the trie, printing the prefix of each node with rules.
        let mut stack: Vec<(u32, Vec<u8>)> = vec![(0, vec![])];
        let mut lines = vec![];
        while let Some((node, prefix)) = stack.pop() {
            let n = &idx.trie[node as usize];
            if let Some(list) = &n.rules {
                let mut line = format!("  path ^= {}: ", String::from_utf8_lossy(&prefix));
                self.dump_list(list, &mut line);
                lines.push(line);
            }
            for (b, child) in n.children.iter().rev() {
                let mut p = prefix.clone();
                p.push(*b);
                stack.push((*child, p));
            }
        }
        for l in lines {
            out.push_str(&l);
        }
        self.dump_suffixes(idx, out);
    }

    fn dump_suffixes(&self, idx: &PathIndex, out: &mut String) {
        // Depth-first over the reversed suffixes, printing each suffix with rules.
        let mut stack: Vec<(u32, Vec<u8>)> = vec![(0, vec![])];
        let mut lines = vec![];
        while let Some((node, reversed)) = stack.pop() {
            let n = &idx.suffix_trie[node as usize];
            if let Some(list) = &n.rules {
                let suffix: Vec<u8> = reversed.iter().rev().copied().collect();
                let mut line = format!("  path $= {}: ", String::from_utf8_lossy(&suffix));
                self.dump_list(list, &mut line);
                lines.push(line);
            }
            for (b, child) in n.children.iter().rev() {
                let mut r = reversed.clone();
                r.push(*b);
                stack.push((*child, r));
            }
        }
        for l in lines {
            out.push_str(&l);
        }
    }
}
