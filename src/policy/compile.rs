//! The checked rules into the decision tree (no IO).
//!
//! From each rule's top-level conjunction the compiler takes one host
//! constraint (exact names or a `.suffix`) and one path constraint (an exact
//! path, a prefix, or the literal prefix of an anchored regex or glob) and
//! uses them to place the rule in the tree; everything else stays as the
//! rule's residual test. Path regexes that share a leaf are combined into one
//! [`regex::RegexSet`] so that their number hardly matters.

use super::model::{Atom, Cond, Field, RuleSpec, Test};
use super::tree::{Entry, PathIndex, Residual, RuleIdx, RuleList, Tree};
use regex::Regex;
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::Look;

/// From this many path regexes in one leaf on, they are matched as one set.
pub const REGEX_SET_MIN: usize = 4;

/// Where the tree places a rule.
#[derive(Debug, Default)]
struct Placement {
    hosts: HostKey,
    path: PathKey,
}

#[derive(Debug, Default)]
enum HostKey {
    #[default]
    Any,
    Exact(Vec<String>),
    Suffix(String),
}

#[derive(Debug, Default)]
enum PathKey {
    #[default]
    Any,
    Exact(String),
    Prefix(String),
}

/// Builds the tree for the rules, in policy order.
pub fn compile(rules: &[RuleSpec]) -> Tree {
    let mut tree = Tree::default();
    for (i, rule) in rules.iter().enumerate() {
        let (placement, residual) = place(&rule.when);
        tree.residuals.push(residual);
        tree.names.push(rule.name.clone());
        let idx = i as RuleIdx;
        match placement.hosts {
            HostKey::Any => insert(&mut tree.any_host, &placement.path, idx),
            HostKey::Exact(hosts) => {
                for h in hosts {
                    let index = tree.exact_hosts.entry(h.into_boxed_str()).or_default();
                    insert(index, &placement.path, idx);
                }
            }
            HostKey::Suffix(s) => {
                let index = tree.suffix_hosts.entry(s.into_boxed_str()).or_default();
                insert(index, &placement.path, idx);
            }
        }
    }
    let residuals = std::mem::take(&mut tree.residuals);
    for_each_list(&mut tree, |list| build_set(list, &residuals));
    tree.residuals = residuals;
    tree
}

fn for_each_list(tree: &mut Tree, mut f: impl FnMut(&mut RuleList)) {
    let indexes = tree
        .exact_hosts
        .values_mut()
        .chain(tree.suffix_hosts.values_mut())
        .chain(std::iter::once(&mut tree.any_host));
    for idx in indexes {
        for list in idx.exact.values_mut() {
            f(list);
        }
        for node in &mut idx.trie {
            if let Some(list) = &mut node.rules {
                f(list);
            }
        }
    }
}

/// Gives a list its regex set when it has enough path regexes.
fn build_set(list: &mut RuleList, residuals: &[Residual]) {
    let with_regex: Vec<usize> = list
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| residuals[e.rule as usize].path_regex.is_some())
        .map(|(i, _)| i)
        .collect();
    if with_regex.len() < REGEX_SET_MIN {
        return;
    }
    let patterns = with_regex.iter().map(|&i| {
        residuals[list.entries[i].rule as usize]
            .path_regex
            .as_ref()
            .expect("filtered")
            .as_str()
    });
    // The patterns compiled one by one; a set of them only fails on size, and
    // then the entries keep testing their own regex.
    if let Ok(set) = regex::RegexSetBuilder::new(patterns)
        .size_limit(64 << 20)
        .dfa_size_limit(16 << 20)
        .build()
    {
        for (slot, &i) in with_regex.iter().enumerate() {
            list.entries[i].slot = Some(slot as u32);
        }
        list.set = Some(set);
    }
}

fn insert(index: &mut PathIndex, path: &PathKey, rule: RuleIdx) {
    let entry = Entry { rule, slot: None };
    match path {
        PathKey::Any => index.trie[0]
            .rules
            .get_or_insert_with(RuleList::default)
            .entries
            .push(entry),
        PathKey::Exact(p) => index
            .exact
            .entry(p.clone().into_boxed_str())
            .or_default()
            .entries
            .push(entry),
        PathKey::Prefix(p) => {
            let mut node = 0u32;
            for &b in p.as_bytes() {
                node = match index.child(node, b) {
                    Some(c) => c,
                    None => {
                        let id = index.trie.len() as u32;
                        index.trie.push(Default::default());
                        let children = &mut index.trie[node as usize].children;
                        let at = children.partition_point(|(c, _)| *c < b);
                        children.insert(at, (b, id));
                        id
                    }
                };
            }
            index.trie[node as usize]
                .rules
                .get_or_insert_with(RuleList::default)
                .entries
                .push(entry);
        }
    }
}

/// Splits a rule's condition into its placement and its residual.
fn place(when: &Cond) -> (Placement, Residual) {
    let conjuncts: Vec<Cond> = match when {
        Cond::True => vec![],
        Cond::And(parts) => parts.clone(),
        other => vec![other.clone()],
    };
    let mut placement = Placement::default();
    let mut path_regex = None;
    let mut rest = vec![];
    let mut host_done = false;
    let mut path_done = false;
    for c in conjuncts {
        if let Cond::Atom(a) = &c {
            if !host_done {
                if let Some(h) = host_key(a) {
                    placement.hosts = h;
                    host_done = true;
                    continue;
                }
            }
            if !path_done {
                if let Some((p, re)) = path_key(a) {
                    placement.path = p;
                    path_done = true;
                    if re.is_some() {
                        path_regex = re;
                    }
                    continue;
                }
            }
        }
        rest.push(c);
    }
    let rest = match rest.len() {
        0 => Cond::True,
        1 => rest.pop().expect("one"),
        _ => Cond::And(rest),
    };
    let rest_is_true = matches!(rest, Cond::True);
    (
        placement,
        Residual {
            path_regex,
            rest,
            rest_is_true,
        },
    )
}

fn host_key(a: &Atom) -> Option<HostKey> {
    match (&a.field, &a.test) {
        (Field::Host, Test::Eq(h)) => Some(HostKey::Exact(vec![h.clone()])),
        (Field::Host, Test::InSet(hs)) => Some(HostKey::Exact(hs.clone())),
        (Field::Host, Test::Suffix(s)) if s.starts_with('.') && s.len() > 1 => {
            Some(HostKey::Suffix(s.clone()))
        }
        _ => None,
    }
}

/// The path placement of an atom, and the regex still to test when the
/// placement is only a regex's literal prefix.
fn path_key(a: &Atom) -> Option<(PathKey, Option<Regex>)> {
    match (&a.field, &a.test) {
        (Field::Path, Test::Eq(p)) => Some((PathKey::Exact(p.clone()), None)),
        (Field::Path, Test::Prefix(p)) => Some((PathKey::Prefix(p.clone()), None)),
        (Field::Path, Test::Matches(re)) => {
            let prefix = anchored_literal_prefix(re.as_str()).unwrap_or_default();
            let key = if prefix.is_empty() {
                PathKey::Any
            } else {
                PathKey::Prefix(prefix)
            };
            Some((key, Some(re.clone())))
        }
        _ => None,
    }
}

/// The literal text every match of an anchored regex starts with, if any.
pub fn anchored_literal_prefix(pattern: &str) -> Option<String> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .ok()?;
    if !hir.properties().look_set_prefix().contains(Look::Start) {
        return None;
    }
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let lcp = seq.longest_common_prefix()?;
    std::str::from_utf8(lcp).ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_prefixes_of_anchored_regexes() {
        assert_eq!(
            anchored_literal_prefix("^/api/v[0-9]+/").as_deref(),
            Some("/api/v")
        );
        assert_eq!(anchored_literal_prefix("^/(ab|ac)x").as_deref(), Some("/a"));
        assert_eq!(anchored_literal_prefix(r"\.css$"), None);
        assert_eq!(anchored_literal_prefix("^[a-z]+").as_deref(), Some(""));
        // Case-insensitive literals have no single prefix beyond the first cased byte.
        assert_eq!(anchored_literal_prefix("(?i)^/Ab").as_deref(), Some("/"));
    }
}
