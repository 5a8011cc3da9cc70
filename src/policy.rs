//! The policy language, as a pipeline: [`load`] parses the text (pest),
//! checks it (every problem at once, with spans), and compiles the checked
//! rules into an immutable decision tree. [`Policy::decide`] walks that tree
//! for one request.
//!
//! ```text
//! text --parse--> ast --check--> model --compile--> tree --eval(request)--> Decision
//! ```

pub mod ast;
pub mod check;
pub mod compile;
pub mod diag;
pub mod eval;
pub mod model;
pub mod parse;
pub mod pattern;
pub mod testing;
pub mod tree;

use diag::{Diagnostic, Source};
use eval::{NoTrace, Request, Response};
use model::{Model, ResponseActions, RuleSpec};

/// The defaults, written in the language itself.
pub const BUILTIN: &str = include_str!("../policies/builtin.policy");

/// A checked, compiled policy. Immutable; swapped whole on reload.
#[derive(Debug)]
pub struct Policy {
    pub source: Source,
    pub model: Model,
    pub tree: tree::Tree,
    /// The test blocks, run by `portico test`.
    pub tests: Vec<ast::TestBlock>,
    /// Warnings found while loading (errors prevent loading).
    pub warnings: Vec<Diagnostic>,
    /// The rule answering requests that match no rule: 404.
    no_route: RuleSpec,
}

/// Why a policy was refused: its source and every diagnostic, errors and warnings.
#[derive(Debug)]
pub struct LoadError {
    pub source: Source,
    pub diagnostics: Vec<Diagnostic>,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source.render_all(&self.diagnostics))
    }
}

impl std::error::Error for LoadError {}

/// What [`check_text`] found: the source, the model and tests when it
/// parsed, and every diagnostic.
pub type Checked = (
    Source,
    Option<(Model, Vec<ast::TestBlock>)>,
    Vec<Diagnostic>,
);

/// Parses and checks a policy text, returning the model and every diagnostic.
pub fn check_text(text: &str, name: &str) -> Checked {
    let source = Source::new(name, text);
    let file = match parse::parse(text) {
        Ok(f) => f,
        Err(d) => {
            let further = parse::further_syntax_errors(text, &d);
            let mut diagnostics = vec![d];
            diagnostics.extend(further);
            return (source, None, diagnostics);
        }
    };
    let (model, diags) = check::check(&file, &|off| source.line_col(off).0);
    (source, Some((model, file.tests)), diags)
}

/// Parses, checks and compiles a policy. Fails when there is any error.
pub fn load(text: &str, name: &str) -> Result<Policy, LoadError> {
    let (source, checked, diagnostics) = check_text(text, name);
    match checked {
        Some((model, tests)) if !diagnostics.iter().any(Diagnostic::is_error) => {
            Ok(Policy::from_model(source, model, tests, diagnostics))
        }
        _ => Err(LoadError {
            source,
            diagnostics,
        }),
    }
}

/// The built-in policy with its one backend server replaced, as
/// `portico run -b HOST:PORT` uses it.
pub fn builtin(server: &str) -> Result<Policy, LoadError> {
    let mut policy = load(BUILTIN, "builtin.policy")?;
    let valid = server
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid {
        return Err(LoadError {
            source: diag::Source::new("-b", server),
            diagnostics: vec![Diagnostic::error(
                "invalid-address",
                ast::Span::new(0, server.len()),
                format!("`{server}` is not a server address"),
            )
            .with_help("write HOST:PORT, like 127.0.0.1:3000")],
        });
    }
    let origin = policy
        .model
        .backend("origin")
        .expect("the built-in policy defines `origin`");
    policy.model.backends[origin].servers = vec![model::ServerSpec {
        addr: server.to_string(),
        weight: 1,
        backup: false,
    }];
    Ok(policy)
}

impl Policy {
    fn from_model(
        source: Source,
        model: Model,
        tests: Vec<ast::TestBlock>,
        warnings: Vec<Diagnostic>,
    ) -> Policy {
        let tree = compile::compile(&model.rules);
        Policy {
            source,
            model,
            tree,
            tests,
            warnings,
            no_route: RuleSpec {
                name: "(no rule)".into(),
                span: Default::default(),
                line: 0,
                when: model::Cond::True,
                outcome: model::Outcome::NoRoute,
                cache: None,
                compress: None,
                limiter: None,
                request_headers: vec![],
                response_headers: vec![],
                limits: Default::default(),
            },
        }
    }

    /// The decision for a request: the first rule, in policy order, whose condition holds.
    #[inline]
    pub fn decide(&self, req: &Request<'_>) -> Decision<'_> {
        let idx = eval::eval_tree(&self.tree, req, &mut NoTrace);
        self.decision(idx)
    }

    /// Like [`Policy::decide`], also returning the path taken through the tree.
    pub fn decide_traced(&self, req: &Request<'_>) -> (Decision<'_>, Vec<String>) {
        let mut trace = vec![];
        let idx = eval::eval_tree(&self.tree, req, &mut trace);
        (self.decision(idx), trace)
    }

    fn decision(&self, idx: Option<tree::RuleIdx>) -> Decision<'_> {
        match idx {
            Some(i) => Decision {
                index: Some(i as usize),
                rule: &self.model.rules[i as usize],
            },
            None => Decision {
                index: None,
                rule: &self.no_route,
            },
        }
    }

    /// What the response rules say about a response.
    pub fn decide_response(&self, req: &Request<'_>, resp: &Response<'_>) -> ResponseActions {
        eval::eval_response(&self.model.response_rules, req, resp).0
    }

    /// The cache key of a request under a decision, or `None` when it bypasses the cache.
    pub fn cache_key(&self, d: &Decision<'_>, req: &Request<'_>) -> Option<String> {
        let spec = d.rule.cache.as_ref()?;
        let mut key = String::with_capacity(64);
        eval::render_key(&spec.key, req, &mut key);
        Some(key)
    }

    /// The part of `req`'s cache key that comes from its URL, which begins
    /// every key of that URL, and whether the key takes request fields too
    /// (then one URL has a key per value of them). `None` when not cached.
    pub fn url_key(&self, d: &Decision<'_>, req: &Request<'_>) -> Option<(String, bool)> {
        let spec = d.rule.cache.as_ref()?;
        let url_parts = spec
            .key
            .iter()
            .take_while(|p| !p.from_request_fields())
            .count();
        let mut key = String::with_capacity(64);
        eval::render_key(&spec.key[..url_parts], req, &mut key);
        Some((key, url_parts < spec.key.len()))
    }
}

/// The outcome of [`Policy::decide`]: the rule that applies and everything it says.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'p> {
    /// Position of the rule in the policy; `None` when no rule matched.
    pub index: Option<usize>,
    pub rule: &'p RuleSpec,
}
