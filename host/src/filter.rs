//! Filter expressions over host attributes (`xenod hosts --where`).
//!
//! ```text
//! expr  := and ("||" and)*
//! and   := unary ("&&" unary)*
//! unary := "!" unary | "(" expr ")" | NAME OP VALUE
//! OP    := "=" | "==" | "!=" | ">=" | "<=" | ">" | "<"
//! NAME  := [a-z_][a-z0-9_.-]*           e.g. mem_free, hv, label.region
//! VALUE := NUMBER [K|M|G|T] [i][B]      binary multiples: 1G = 2^30
//!        | WORD | "quoted string"
//! ```
//!
//! A name that is a list (`hv`) matches with `=` when any element does,
//! and with `!=` when none does. Numbers compare as numbers; everything
//! else as text (`>`, `<` on text is refused). A name the host does not
//! have never matches (so `label.zone!=a` holds only where there is a
//! zone). A syntax fault names its column.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// An attribute value a host advertises, borrowed from the host's
/// advertisement where it can be (a filter reads it, nothing more).
#[derive(Clone, Debug, PartialEq)]
pub enum Attr<'a> {
    Num(f64),
    Text(Cow<'a, str>),
    List(Cow<'a, [String]>),
}

/// A parsed filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    Or(Vec<Filter>),
    And(Vec<Filter>),
    Not(Box<Filter>),
    Cmp { name: String, op: Op, value: Value },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Ge,
    Le,
    Gt,
    Lt,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Num(f64),
    Text(String),
}

/// A syntax fault, at a 1-based column of the expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterError {
    pub column: usize,
    pub why: String,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at column {}: {}", self.column, self.why)
    }
}

impl std::error::Error for FilterError {}

struct Parser<'a> {
    s: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn fail<T>(&self, why: impl Into<String>) -> Result<T, FilterError> {
        Err(FilterError { column: self.at + 1, why: why.into() })
    }

    fn skip_ws(&mut self) {
        while self.s[self.at..].starts_with(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.skip_ws();
        if self.s[self.at..].starts_with(tok) {
            self.at += tok.len();
            true
        } else {
            false
        }
    }

    fn found(&self) -> String {
        match self.s[self.at..].chars().next() {
            Some(c) => format!("{c:?}"),
            None => "the end".into(),
        }
    }

    fn expr(&mut self) -> Result<Filter, FilterError> {
        let mut v = vec![self.and()?];
        while self.eat("||") {
            v.push(self.and()?);
        }
        Ok(if v.len() == 1 { v.remove(0) } else { Filter::Or(v) })
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut v = vec![self.unary()?];
        while self.eat("&&") {
            v.push(self.unary()?);
        }
        Ok(if v.len() == 1 { v.remove(0) } else { Filter::And(v) })
    }

    fn unary(&mut self) -> Result<Filter, FilterError> {
        self.skip_ws();
        if self.s[self.at..].starts_with("!=") {
            return self.fail("expected an attribute name, found \"!=\"");
        }
        if self.eat("!") {
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let e = self.expr()?;
            if !self.eat(")") {
                return self.fail(format!("expected \")\", found {}", self.found()));
            }
            return Ok(e);
        }
        let name = self.name()?;
        let op = self.op()?;
        let value = self.value()?;
        Ok(Filter::Cmp { name, op, value })
    }

    fn name(&mut self) -> Result<String, FilterError> {
        self.skip_ws();
        let rest = &self.s[self.at..];
        let first_ok = rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '_');
        if !first_ok {
            return self.fail(format!("expected an attribute name, found {}", self.found()));
        }
        let n = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c)))
            .unwrap_or(rest.len());
        self.at += n;
        Ok(rest[..n].to_owned())
    }

    fn op(&mut self) -> Result<Op, FilterError> {
        for (tok, op) in [
            ("==", Op::Eq),
            ("!=", Op::Ne),
            (">=", Op::Ge),
            ("<=", Op::Le),
            ("=", Op::Eq),
            (">", Op::Gt),
            ("<", Op::Lt),
        ] {
            if self.eat(tok) {
                return Ok(op);
            }
        }
        self.fail(format!("expected a comparison (= != >= <= > <), found {}", self.found()))
    }

    fn value(&mut self) -> Result<Value, FilterError> {
        self.skip_ws();
        let rest = &self.s[self.at..];
        if let Some(q) = rest.strip_prefix('"') {
            let Some(end) = q.find('"') else {
                return self.fail("unterminated string");
            };
            self.at += end + 2;
            return Ok(Value::Text(q[..end].to_owned()));
        }
        let n = rest.find(|c: char| c.is_whitespace() || "()&|!=<>\"".contains(c)).unwrap_or(rest.len());
        if n == 0 {
            return self.fail(format!("expected a value, found {}", self.found()));
        }
        let word = &rest[..n];
        let v = number(word).map_or_else(|| Value::Text(word.to_owned()), Value::Num);
        self.at += n;
        Ok(v)
    }
}

/// `12`, `1.5`, `512M`, `1G`, `1GiB`, `2T`: binary multiples.
fn number(w: &str) -> Option<f64> {
    let digits = w.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(w.len());
    if digits == 0 {
        return None;
    }
    let n: f64 = w[..digits].parse().ok()?;
    let unit = match w[digits..].trim_end_matches('B').trim_end_matches('i') {
        "" => 1.0,
        "K" | "k" => 1024.0,
        "M" => 1024f64.powi(2),
        "G" => 1024f64.powi(3),
        "T" => 1024f64.powi(4),
        _ => return None,
    };
    Some(n * unit)
}

/// Parses a filter expression.
pub fn parse(s: &str) -> Result<Filter, FilterError> {
    let mut p = Parser { s, at: 0 };
    let f = p.expr()?;
    p.skip_ws();
    if p.at < s.len() {
        return p.fail(format!("expected \"&&\", \"||\" or the end, found {}", p.found()));
    }
    Ok(f)
}

impl Filter {
    /// Whether a host with `attrs` passes; a comparison of text by order
    /// is an error naming it.
    pub fn matches(&self, attrs: &BTreeMap<String, Attr<'_>>) -> Result<bool, String> {
        self.matches_with(&|name| attrs.get(name).cloned())
    }

    /// The same, with each attribute looked up by `get` as the expression
    /// names it (no map built for a host the expression reads two
    /// attributes of).
    pub fn matches_with<'a>(&self, get: &dyn Fn(&str) -> Option<Attr<'a>>) -> Result<bool, String> {
        Ok(match self {
            Filter::Or(v) => {
                for f in v {
                    if f.matches_with(get)? {
                        return Ok(true);
                    }
                }
                false
            }
            Filter::And(v) => {
                for f in v {
                    if !f.matches_with(get)? {
                        return Ok(false);
                    }
                }
                true
            }
            Filter::Not(f) => !f.matches_with(get)?,
            Filter::Cmp { name, op, value } => match get(name) {
                None => false,
                Some(a) => compare(name, &a, *op, value)?,
            },
        })
    }
}

fn compare(name: &str, a: &Attr<'_>, op: Op, v: &Value) -> Result<bool, String> {
    fn text(v: &Value) -> Cow<'_, str> {
        match v {
            Value::Text(t) => Cow::Borrowed(t.as_str()),
            Value::Num(n) => Cow::Owned(format!("{n}")),
        }
    }
    match (a, v) {
        (Attr::Num(x), Value::Num(y)) => Ok(match op {
            Op::Eq => x == y,
            Op::Ne => x != y,
            Op::Ge => x >= y,
            Op::Le => x <= y,
            Op::Gt => x > y,
            Op::Lt => x < y,
        }),
        (Attr::Num(_), Value::Text(t)) => Err(format!("{name} is a number; {t:?} is not")),
        (Attr::Text(x), v) => match op {
            Op::Eq => Ok(*x == text(v)),
            Op::Ne => Ok(*x != text(v)),
            _ => Err(format!("{name} is text: compare it with = or != only")),
        },
        (Attr::List(xs), v) => match op {
            Op::Eq => Ok(xs.iter().any(|x| *x == text(v))),
            Op::Ne => Ok(!xs.iter().any(|x| *x == text(v))),
            _ => Err(format!("{name} is a list: compare it with = or != only")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(mem_free: f64, hv: &[&str], region: Option<&str>) -> BTreeMap<String, Attr<'static>> {
        let mut m = BTreeMap::new();
        m.insert("mem_free".into(), Attr::Num(mem_free));
        m.insert("hv".into(), Attr::List(hv.iter().map(|s| s.to_string()).collect::<Vec<_>>().into()));
        if let Some(r) = region {
            m.insert("label.region".into(), Attr::Text(r.to_owned().into()));
        }
        m
    }

    #[test]
    fn expressions_select_hosts() {
        let g = 1024f64.powi(3);
        let f = parse("mem_free>=1G && hv=kvm && label.region=eu").unwrap();
        assert!(f.matches(&host(2.0 * g, &["kvm", "qemu"], Some("eu"))).unwrap());
        assert!(!f.matches(&host(0.5 * g, &["kvm"], Some("eu"))).unwrap());
        assert!(!f.matches(&host(2.0 * g, &["tcg"], Some("eu"))).unwrap());
        assert!(!f.matches(&host(2.0 * g, &["kvm"], None)).unwrap(), "a missing label never matches");
        let f = parse(r#"!(hv = tcg) || label.region == "us east""#).unwrap();
        assert!(f.matches(&host(1.0, &["kvm"], None)).unwrap());
        assert!(f.matches(&host(1.0, &["tcg"], Some("us east"))).unwrap());
        assert!(!f.matches(&host(1.0, &["tcg"], Some("eu"))).unwrap());
        assert_eq!(number("512MiB"), Some(512.0 * 1024.0 * 1024.0));
        assert!(parse("hv>kvm").unwrap().matches(&host(1.0, &["kvm"], None)).is_err());
    }

    #[test]
    fn syntax_faults_name_their_column() {
        for (expr, column, what) in [
            ("mem_free>=", 11, "expected a value"),
            ("mem_free 1G", 10, "expected a comparison"),
            ("hv=kvm &&", 10, "expected an attribute name"),
            ("(hv=kvm", 8, "expected \")\""),
            ("hv=kvm )", 8, "expected \"&&\""),
            ("Mem=1", 1, "expected an attribute name"),
            ("label.x=\"open", 9, "unterminated"),
        ] {
            let e = parse(expr).unwrap_err();
            assert_eq!(e.column, column, "{expr}: {e}");
            assert!(e.why.contains(what), "{expr}: {e}");
        }
    }
}
