//! The policy language: `load(text, name)` parses, checks and compiles a
//! policy into an immutable decision tree.

pub mod ast;
pub mod diag;
pub mod parse;
