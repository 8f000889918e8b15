//! containerd's filter language, used by every List call and by event subscriptions.
//!
//! ```text
//! filters   := filter ('|'-separated strings are given as several filters; any may match)
//! filter    := selector (',' selector)*          all selectors must match
//! selector  := fieldpath (operator value)?       no operator: the field is present
//! fieldpath := field ('.' field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := '==' | '!=' | '~='
//! value     := quoted | [^\s,]+                  after '~=', `/re/` and `|re|` quote too
//! ```
//!
//! Unlike containerd, a regular expression is compiled while parsing, so a bad one is an
//! `InvalidArgument` error for the caller instead of a filter that silently never matches.

use crate::{Error, Result};
use regex::Regex;

/// What a filter is matched against: an object exposes its fields by path.
pub trait Adaptor {
    /// The value at `path`, or `None` if the object has no such field.
    fn field(&self, path: &[String]) -> Option<String>;
}

impl<F: Fn(&[String]) -> Option<String>> Adaptor for F {
    fn field(&self, path: &[String]) -> Option<String> {
        self(path)
    }
}

#[derive(Debug, Clone)]
enum Operator {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    operator: Operator,
}

impl Selector {
    fn matches(&self, adaptor: &dyn Adaptor) -> bool {
        let value = adaptor.field(&self.path);
        match &self.operator {
            Operator::Present => value.is_some(),
            Operator::Equal(expected) => value.as_deref() == Some(expected.as_str()),
            Operator::NotEqual(expected) => value.as_deref().unwrap_or("") != expected,
            Operator::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

/// A parsed set of filters: matches when any of its filters matches (all of that
/// filter's selectors match). An empty set matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses the filters of a List request (each string is one filter; empty strings
    /// match all, as in containerd).
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter> {
        let mut any = Vec::new();
        for filter in filters {
            let filter = filter.as_ref();
            if filter.is_empty() {
                return Ok(Filter::default());
            }
            any.push(Parser::new(filter).selectors().map_err(|msg| {
                Error::invalid_argument(format!("filters: parse error: [{filter}]: {msg}"))
            })?);
        }
        Ok(Filter { any })
    }

    pub fn parse(filter: &str) -> Result<Filter> {
        Self::parse_all(&[filter])
    }

    pub fn matches(&self, adaptor: &dyn Adaptor) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|selector| selector.matches(adaptor)))
    }

    pub fn matches_all(&self) -> bool {
        self.any.is_empty()
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

type ParseResult<T> = std::result::Result<T, String>;

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser { input, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn error(&self, what: &str) -> String {
        format!("{what} at offset {}", self.pos)
    }

    fn selectors(&mut self) -> ParseResult<Vec<Selector>> {
        let mut selectors = vec![self.selector()?];
        loop {
            self.skip_space();
            match self.peek() {
                None => return Ok(selectors),
                Some(',') => {
                    self.pos += 1;
                    selectors.push(self.selector()?);
                }
                Some(c) => return Err(self.error(&format!("unexpected input: {c:?}"))),
            }
        }
    }

    fn selector(&mut self) -> ParseResult<Selector> {
        let path = self.fieldpath()?;
        self.skip_space();
        if matches!(self.peek(), None | Some(',')) {
            return Ok(Selector {
                path,
                operator: Operator::Present,
            });
        }
        let op = self.rest().get(..2).unwrap_or_default();
        let operator = match op {
            "==" | "!=" | "~=" => {
                self.pos += 2;
                op
            }
            _ => return Err(self.error(r#"expected an operator ("=="|"!="|"~=")"#)),
        };
        self.skip_space();
        let value = self.value(operator == "~=")?;
        let operator = match operator {
            "==" => Operator::Equal(value),
            "!=" => Operator::NotEqual(value),
            _ => Operator::Matches(
                Regex::new(&value)
                    .map_err(|e| format!("invalid regular expression {value:?}: {e}"))?,
            ),
        };
        Ok(Selector { path, operator })
    }

    fn fieldpath(&mut self) -> ParseResult<Vec<String>> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> ParseResult<String> {
        self.skip_space();
        match self.peek() {
            Some('"') | Some('\'') => self.quoted(),
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                let len = self
                    .rest()
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(self.rest().len());
                let field = self.rest()[..len].to_string();
                self.pos += len;
                Ok(field)
            }
            Some(_) => Err(self.error("expected field or quoted")),
            None => Err(self.error("expected field or quoted")),
        }
    }

    fn value(&mut self, regex_quotes: bool) -> ParseResult<String> {
        match self.peek() {
            Some('"') | Some('\'') => self.quoted(),
            Some('/') | Some('|') if regex_quotes => self.quoted(),
            Some(c) if c != ',' && !c.is_whitespace() => {
                let len = self
                    .rest()
                    .find(|c: char| c == ',' || c.is_whitespace())
                    .unwrap_or(self.rest().len());
                let value = self.rest()[..len].to_string();
                self.pos += len;
                Ok(value)
            }
            _ => Err(self.error("expected value or quoted")),
        }
    }

    /// A Go-syntax quoted string; `/` and `|` quote like `"` (for regular expressions).
    fn quoted(&mut self) -> ParseResult<String> {
        let quote = self.peek().expect("caller checked a quote");
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => {
                    let (_, escaped) = chars
                        .next()
                        .ok_or_else(|| self.error("unterminated escape"))?;
                    let unescaped = match escaped {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        'a' => '\x07',
                        'b' => '\x08',
                        'f' => '\x0c',
                        'v' => '\x0b',
                        '\\' => '\\',
                        c if c == quote => c,
                        // Regular expressions keep their own escapes (`\d`, `\.`).
                        c if quote == '/' || quote == '|' => {
                            out.push('\\');
                            c
                        }
                        c => return Err(self.error(&format!("invalid escape \\{c}"))),
                    };
                    out.push(unescaped);
                }
                c => out.push(c),
            }
        }
        Err(self.error("quoted literal not terminated"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn object(fields: &[(&str, &str)]) -> impl Fn(&[String]) -> Option<String> {
        let map: HashMap<String, String> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |path: &[String]| map.get(&path.join("\u{0}")).cloned()
    }

    fn matches(filter: &str, fields: &[(&str, &str)]) -> bool {
        Filter::parse(filter).unwrap().matches(&object(fields))
    }

    #[test]
    fn equality_presence_and_conjunction() {
        let img = [
            ("name", "docker.io/library/busybox:latest"),
            ("labels\u{0}a.b", "c"),
        ];
        assert!(matches("name==docker.io/library/busybox:latest", &img));
        assert!(matches(r#"labels."a.b"==c"#, &img));
        assert!(matches(r#"labels."a.b""#, &img));
        assert!(!matches("labels.missing", &img));
        assert!(matches(r#"name!=x,labels."a.b"==c"#, &img));
        assert!(!matches(r#"name!=x,labels."a.b"==d"#, &img));
        assert!(matches("missing!=x", &img));
    }

    #[test]
    fn regular_expressions_with_alternative_quotes() {
        let img = [("name", "docker.io/library/busybox:latest")];
        assert!(matches("name~=busybox", &img));
        assert!(matches("name~=/^docker\\.io/", &img));
        assert!(matches("name~=|busy(box)?|", &img));
        assert!(!matches("name~=^alpine", &img));
    }

    #[test]
    fn any_of_several_filters() {
        let f = Filter::parse_all(&["name==a", "name==b"]).unwrap();
        assert!(f.matches(&object(&[("name", "b")])));
        assert!(!f.matches(&object(&[("name", "c")])));
        assert!(
            Filter::parse_all::<&str>(&[])
                .unwrap()
                .matches(&object(&[]))
        );
    }

    #[test]
    fn malformed_filters_are_invalid_arguments() {
        for bad in [
            "name==",
            "name=x",
            ",",
            "name==a,",
            "labels.\"unterminated",
            "name~=(",
            "==",
        ] {
            let err = Filter::parse(bad).expect_err(bad);
            assert_eq!(
                err.kind(),
                crate::error::ErrorKind::InvalidArgument,
                "{bad}"
            );
        }
    }
}
