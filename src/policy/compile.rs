//! The checked rules into the decision tree (no IO).
//!
//! From each rule's top-level conjunction the compiler takes one host
//! constraint (exact names or a `.suffix`) and one path constraint (an exact
//! path, a prefix, a suffix, the literal prefix of a regex or glob anchored
//! at the start, or else the literal suffix of a regex anchored at the end)
//! and uses them to place the rule in the tree; everything else stays as the
//! rule's residual test. Path regexes that share a leaf are combined into one
//! [`regex::RegexSet`] so that their number hardly matters.

use super::model::{Atom, Cond, Field, Pattern, RuleSpec, Test};
pub use super::pattern::anchored_literals;
use super::tree::{Entry, PathIndex, Residual, RuleIdx, RuleList, Tree, TrieNode};

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
    Suffix(String),
}

/// Builds the tree for the rules, in policy order.
pub fn compile(rules: &[RuleSpec]) -> Tree {
    let mut tree = Tree::default();
    for (i, (rule, (placement, residual))) in rules.iter().zip(place_all(rules)).enumerate() {
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

/// Below this many rules, placing them on one thread is quicker than starting others.
const PARALLEL_MIN: usize = 512;

/// Places every rule. Finding the literal prefix or suffix of a regex parses
/// it again, so large policies spread the rules over the available cores.
fn place_all(rules: &[RuleSpec]) -> Vec<(Placement, Residual)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || rules.len() < PARALLEL_MIN {
        return rules.iter().map(|r| place(&r.when)).collect();
    }
    let chunk = rules.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = rules
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || part.iter().map(|r| place(&r.when)).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(placed) => placed,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
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
        for node in idx.trie.iter_mut().chain(idx.suffix_trie.iter_mut()) {
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
        let len = list.entries.len() as u32;
        let mut next_plain = vec![len; list.entries.len()];
        let mut next = len;
        for (i, e) in list.entries.iter().enumerate().rev() {
            if e.slot.is_none() {
                next = i as u32;
            }
            next_plain[i] = next;
        }
        list.next_plain = next_plain;
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
        PathKey::Prefix(p) => trie_insert(&mut index.trie, p.bytes(), entry),
        PathKey::Suffix(s) => trie_insert(&mut index.suffix_trie, s.bytes().rev(), entry),
    }
}

/// Adds an entry at the node for a byte string, creating the nodes on the way.
fn trie_insert(trie: &mut Vec<TrieNode>, key: impl Iterator<Item = u8>, entry: Entry) {
    let mut node = 0u32;
    for b in key {
        node = match super::tree::trie_child(trie, node, b) {
            Some(c) => c,
            None => {
                let id = trie.len() as u32;
                trie.push(TrieNode::default());
                let children = &mut trie[node as usize].children;
                let at = children.partition_point(|(c, _)| *c < b);
                children.insert(at, (b, id));
                id
            }
        };
    }
    trie[node as usize]
        .rules
        .get_or_insert_with(RuleList::default)
        .entries
        .push(entry);
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
fn path_key(a: &Atom) -> Option<(PathKey, Option<Pattern>)> {
    match (&a.field, &a.test) {
        (Field::Path, Test::Eq(p)) => Some((PathKey::Exact(p.clone()), None)),
        (Field::Path, Test::Prefix(p)) => Some((PathKey::Prefix(p.clone()), None)),
        (Field::Path, Test::Suffix(s)) if !s.is_empty() => Some((PathKey::Suffix(s.clone()), None)),
        (Field::Path, Test::Matches(re)) => {
            let (prefix, suffix) = (
                re.anchored_prefix().map(str::to_string),
                re.anchored_suffix().map(str::to_string),
            );
            let key = match (prefix, suffix) {
                (Some(p), _) if !p.is_empty() => PathKey::Prefix(p),
                (_, Some(s)) if !s.is_empty() => PathKey::Suffix(s),
                _ => PathKey::Any,
            };
            Some((key, Some(re.clone())))
        }
        _ => None,
    }
}

/// The literal text every match of an anchored regex starts with, if any.
pub fn anchored_literal_prefix(pattern: &str) -> Option<String> {
    anchored_literals(pattern).0
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
        // No literal prefix: the rule is placed under any path.
        assert!(anchored_literal_prefix("^[a-z]+").is_none_or(|p| p.is_empty()));
        // Case-insensitive literals have no single prefix beyond the first cased byte.
        assert_eq!(anchored_literal_prefix("(?i)^/Ab").as_deref(), Some("/"));
    }

    #[test]
    fn literal_suffixes_of_end_anchored_regexes() {
        let suffix = |p: &str| anchored_literals(p).1;
        assert_eq!(suffix(r"\.css$").as_deref(), Some(".css"));
        assert_eq!(suffix(r"\.(css|js)$").as_deref(), Some("s"));
        assert_eq!(suffix(r"/v[0-9]+/items$").as_deref(), Some("/items"));
        // Not anchored at the end, or anchored at the end of a line only.
        assert_eq!(suffix(r"\.css"), None);
        assert_eq!(suffix(r"(?m)\.css$"), None);
        assert_eq!(suffix(r"\.css$|\.js"), None);
        // A literal prefix is preferred; the suffix is not computed then.
        assert_eq!(
            anchored_literals(r"^/a/.*\.css$"),
            (Some("/a/".into()), None)
        );
    }

    #[test]
    fn end_anchored_regexes_are_placed_by_suffix() {
        use crate::policy::load;
        let text = "backend b { server \"127.0.0.1:1\" }\n\
                    rule css when path ~ \"\\\\.css$\" { route b }\n\
                    rule png when path $= \".png\" { route b }\n\
                    rule any when path ~ \"v[12]\" { route b }\n";
        let policy = load(text, "t.policy").expect("loads");
        let dump = policy.tree.dump();
        assert!(dump.contains("path $= .css: #1 css (regex)"), "{dump}");
        assert!(dump.contains("path $= .png: #2 png"), "{dump}");
        assert!(dump.contains("path ^= : #3 any (regex)"), "{dump}");
    }

    #[test]
    fn globs_and_literal_regexes_join_a_leafs_regex_set() {
        use crate::policy::eval::{Request, Scheme};
        use crate::policy::load;
        let text = "backend b { server \"127.0.0.1:1\" }\n\
                    rule css when path glob \"/s/*.css\" { route b }\n\
                    rule js when path glob \"/s/**.js\" { route b }\n\
                    rule txt when path glob \"/s/?.txt\" { route b }\n\
                    rule img when path ~ \"^/s/[a-z]+\\\\.png$\" { route b }\n\
                    rule rest when path ~ \"^/s/\" { route b }\n";
        let policy = load(text, "t.policy").expect("loads");
        let dump = policy.tree.dump();
        assert!(
            dump.contains(
                "path ^= /s/: #1 css (regex), #2 js (regex), #3 txt (regex), \
             #4 img (regex), #5 rest (regex) [regex set]"
            ),
            "{dump}"
        );
        let (method, headers) = (http::Method::GET, http::HeaderMap::new());
        let pick = |path: &str| {
            let req = Request {
                method: &method,
                scheme: Scheme::Https,
                host: "a.test",
                path,
                query: "",
                headers: &headers,
                client_ip: None,
            };
            policy.decide(&req).index
        };
        assert_eq!(pick("/s/app.css"), Some(0));
        // `*` stops at `/`: only the last rule takes it.
        assert_eq!(pick("/s/a/app.css"), Some(4));
        assert_eq!(pick("/s/a/app.js"), Some(1));
        assert_eq!(pick("/s/a.txt"), Some(2));
        assert_eq!(pick("/s/ab.txt"), Some(4));
        assert_eq!(pick("/s/logo.png"), Some(3));
        assert_eq!(pick("/t/logo.png"), None);
    }
}
