//! What a sink does to a table's rows on their way into the target: drop columns, mask
//! values, keep only the rows a filter accepts. The sink applies it to every change it
//! replays (the snapshot's too), `backfill --direct` to every row it copies, and `verify`
//! to the source rows before it compares them with the target.
//!
//! A filter is a small SQL-like predicate over the row's columns:
//! `region = 'eu' and (amount >= 100 or vip) and note is not null and kind in ('a', 'b')`.
//! It follows SQL's three-valued logic: a comparison with a NULL is unknown, and only rows
//! the filter holds true for are kept.
//!
//! Filters decide per row image, so they stay right under updates: an update whose new
//! image the filter rejects becomes a delete in the target (the row may have been kept
//! before), and an update whose new image it accepts is applied as an upsert.

use crate::{ColumnDefinition, Row, UNAVAILABLE_VALUE};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::fmt::Write;

/// How a masked column's value is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// The SHA-256 of the value's text, in lower-case hex: equal values stay equal (joins
    /// and `GROUP BY` still work) but the value cannot be read back.
    Hash,
    /// NULL.
    Null,
}

impl Mask {
    /// The masked form of a value. NULL stays NULL and a value the source did not send
    /// ([`UNAVAILABLE_VALUE`]) stays unsent, so the target keeps its masked copy.
    pub fn apply(self, value: &Value) -> Value {
        match (self, value) {
            (_, Value::Null) => Value::Null,
            (_, Value::String(s)) if s == UNAVAILABLE_VALUE => value.clone(),
            (Mask::Null, _) => Value::Null,
            (Mask::Hash, Value::String(s)) => Value::String(sha256_hex(s.as_bytes())),
            (Mask::Hash, other) => Value::String(sha256_hex(other.to_string().as_bytes())),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Everything one sink does to one table's rows (every matching transform of the sink,
/// merged: dropped columns and masks add up, filters must all accept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableTransform {
    /// Columns left out of the target.
    pub drop_columns: Vec<String>,
    /// Columns whose values are replaced.
    pub masks: Vec<(String, Mask)>,
    /// Rows kept only where every filter holds.
    pub filters: Vec<Filter>,
}

/// What a filter says about a row image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The row belongs in the target.
    Keep,
    /// The row does not belong in the target.
    Reject,
    /// The filter reads a column the source did not send (an unchanged TOASTed value), so
    /// it cannot decide; the change is applied as it is.
    Undecided,
}

impl TableTransform {
    /// Whether it changes anything.
    pub fn is_identity(&self) -> bool {
        self.drop_columns.is_empty() && self.masks.is_empty() && self.filters.is_empty()
    }

    /// Whether it only removes columns (the rest of the row passes unchanged).
    pub fn only_drops_columns(&self) -> bool {
        self.masks.is_empty() && self.filters.is_empty()
    }

    /// Refuses to drop or mask a primary-key column: the target row could no longer be
    /// found by its key.
    pub fn check_key(&self, key: &Row) -> Result<(), String> {
        let touched = self
            .drop_columns
            .iter()
            .map(|c| (c, "dropped"))
            .chain(self.masks.iter().map(|(c, _)| (c, "masked")));
        for (column, what) in touched {
            if key.contains_key(column) {
                return Err(format!(
                    "column `{column}` is part of the primary key and cannot be {what}"
                ));
            }
        }
        Ok(())
    }

    /// Drops and masks columns of a row image, in place.
    pub fn shape(&self, row: &mut Row) {
        for column in &self.drop_columns {
            row.remove(column);
        }
        for (column, mask) in &self.masks {
            if let Some(value) = row.get_mut(column) {
                *value = mask.apply(value);
            }
        }
    }

    /// A whole row image as the target should hold it: `None` when the filter rejects it,
    /// else shaped. (Sinks decide on changes with [`TableTransform::verdict`], since an
    /// undecided or rejected update needs more than this.)
    pub fn transformed(&self, mut image: Row) -> Option<Row> {
        if self.verdict(&image) == Verdict::Reject {
            return None;
        }
        self.shape(&mut image);
        Some(image)
    }

    /// Whether a row image (before shaping) belongs in the target.
    pub fn verdict(&self, row: &Row) -> Verdict {
        let mut verdict = Verdict::Keep;
        for filter in &self.filters {
            match filter.evaluate(row) {
                Truth::True => {}
                Truth::False | Truth::Unknown => return Verdict::Reject,
                Truth::Unavailable => verdict = Verdict::Undecided,
            }
        }
        verdict
    }

    /// Column definitions as the target receives them: dropped columns left out, hashed
    /// columns `text`, nulled columns nullable.
    pub fn shape_definitions(&self, columns: Vec<ColumnDefinition>) -> Vec<ColumnDefinition> {
        columns
            .into_iter()
            .filter(|c| !self.drop_columns.contains(&c.name))
            .map(|mut c| {
                match self.masks.iter().find(|(name, _)| *name == c.name) {
                    Some((_, Mask::Hash)) => c.sql_type = "text".into(),
                    Some((_, Mask::Null)) => c.not_null = false,
                    None => {}
                }
                c
            })
            .collect()
    }

    /// The column names a target holds, from the source's (dropped ones left out).
    pub fn kept_columns(&self, columns: &[String]) -> Vec<String> {
        columns
            .iter()
            .filter(|c| !self.drop_columns.contains(c))
            .cloned()
            .collect()
    }
}

/// A parsed row filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    text: String,
    expr: Expr,
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Compare(String, CompareOp, Literal),
    In(String, Vec<Literal>, bool),
    IsNull(String, bool),
    Column(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Text(String),
    Number(f64),
    Bool(bool),
}

/// SQL's three truth values, plus "a column the source did not send".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    True,
    False,
    Unknown,
    Unavailable,
}

impl Truth {
    fn not(self) -> Truth {
        match self {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            other => other,
        }
    }

    fn and(self, other: Truth) -> Truth {
        use Truth::*;
        match (self, other) {
            (False, _) | (_, False) => False,
            (Unavailable, _) | (_, Unavailable) => Unavailable,
            (Unknown, _) | (_, Unknown) => Unknown,
            (True, True) => True,
        }
    }

    fn or(self, other: Truth) -> Truth {
        use Truth::*;
        match (self, other) {
            (True, _) | (_, True) => True,
            (Unavailable, _) | (_, Unavailable) => Unavailable,
            (Unknown, _) | (_, Unknown) => Unknown,
            (False, False) => False,
        }
    }
}

impl From<bool> for Truth {
    fn from(b: bool) -> Self {
        if b {
            Truth::True
        } else {
            Truth::False
        }
    }
}

impl Filter {
    /// Parses a filter; the error says what was expected and at which character.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let tokens = tokenize(text)?;
        if tokens.is_empty() {
            return Err("the filter is empty".into());
        }
        let mut parser = Parser { tokens, at: 0 };
        let expr = parser.or()?;
        if let Some((token, offset)) = parser.tokens.get(parser.at) {
            return Err(format!(
                "unexpected {} at character {}",
                token.describe(),
                offset + 1
            ));
        }
        Ok(Filter {
            text: text.to_string(),
            expr,
        })
    }

    /// The columns the filter reads.
    pub fn columns(&self) -> Vec<&str> {
        let mut columns = Vec::new();
        let mut pending = vec![&self.expr];
        while let Some(expr) = pending.pop() {
            match expr {
                Expr::Or(a, b) | Expr::And(a, b) => {
                    pending.push(a);
                    pending.push(b);
                }
                Expr::Not(e) => pending.push(e),
                Expr::Compare(c, _, _) | Expr::In(c, _, _) | Expr::IsNull(c, _) => {
                    columns.push(c.as_str())
                }
                Expr::Column(c) => columns.push(c.as_str()),
            }
        }
        columns
    }

    /// Whether the filter holds for a row image (a missing column reads as NULL).
    fn evaluate(&self, row: &Row) -> Truth {
        evaluate(&self.expr, row)
    }

    /// Whether the filter keeps a row image.
    pub fn keeps(&self, row: &Row) -> bool {
        self.evaluate(row) == Truth::True
    }
}

fn evaluate(expr: &Expr, row: &Row) -> Truth {
    let value = |column: &str| row.get(column).unwrap_or(&Value::Null);
    let unavailable = |v: &Value| matches!(v, Value::String(s) if s == UNAVAILABLE_VALUE);
    match expr {
        Expr::Or(a, b) => evaluate(a, row).or(evaluate(b, row)),
        Expr::And(a, b) => evaluate(a, row).and(evaluate(b, row)),
        Expr::Not(e) => evaluate(e, row).not(),
        Expr::IsNull(column, negated) => {
            let v = value(column);
            if unavailable(v) {
                Truth::Unavailable
            } else {
                Truth::from(v.is_null() != *negated)
            }
        }
        Expr::Column(column) => {
            let v = value(column);
            if unavailable(v) {
                return Truth::Unavailable;
            }
            match compare(v, &Literal::Bool(true)) {
                None => Truth::Unknown,
                Some(ordering) => Truth::from(ordering == Ordering::Equal),
            }
        }
        Expr::Compare(column, op, literal) => {
            let v = value(column);
            if unavailable(v) {
                return Truth::Unavailable;
            }
            match compare(v, literal) {
                None => Truth::Unknown,
                Some(ordering) => Truth::from(match op {
                    CompareOp::Eq => ordering == Ordering::Equal,
                    CompareOp::Ne => ordering != Ordering::Equal,
                    CompareOp::Lt => ordering == Ordering::Less,
                    CompareOp::Le => ordering != Ordering::Greater,
                    CompareOp::Gt => ordering == Ordering::Greater,
                    CompareOp::Ge => ordering != Ordering::Less,
                }),
            }
        }
        Expr::In(column, list, negated) => {
            let v = value(column);
            if unavailable(v) {
                return Truth::Unavailable;
            }
            let mut truth = Truth::False;
            for literal in list {
                truth = truth.or(match compare(v, literal) {
                    None => Truth::Unknown,
                    Some(ordering) => Truth::from(ordering == Ordering::Equal),
                });
            }
            if *negated {
                truth.not()
            } else {
                truth
            }
        }
    }
}

/// Orders a value against a literal; `None` when either is NULL or they cannot be compared.
/// Numbers compare as numbers whether the envelope carries them as numbers or as strings
/// (decimals); booleans also match 0 and 1 (MySQL's `tinyint(1)`).
fn compare(value: &Value, literal: &Literal) -> Option<Ordering> {
    match (value, literal) {
        (Value::Null, _) => None,
        (Value::Number(n), Literal::Number(x)) => n.as_f64()?.partial_cmp(x),
        (Value::String(s), Literal::Number(x)) => s.trim().parse::<f64>().ok()?.partial_cmp(x),
        (Value::Bool(b), Literal::Bool(x)) => Some(b.cmp(x)),
        (Value::Number(n), Literal::Bool(x)) => match n.as_u64()? {
            0 => Some(false.cmp(x)),
            1 => Some(true.cmp(x)),
            _ => None,
        },
        (Value::String(s), Literal::Text(x)) => Some(s.as_str().cmp(x.as_str())),
        (Value::Number(n), Literal::Text(x)) => Some(n.to_string().as_str().cmp(x.as_str())),
        (Value::Bool(b), Literal::Text(x)) => {
            Some((if *b { "true" } else { "false" }).cmp(x.as_str()))
        }
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Word(Keyword),
    Text(String),
    Number(f64),
    Op(CompareOp),
    Open,
    Close,
    Comma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keyword {
    And,
    Or,
    Not,
    In,
    Is,
    Null,
    True,
    False,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Ident(name) => format!("column `{name}`"),
            Token::Word(word) => format!("`{}`", format!("{word:?}").to_lowercase()),
            Token::Text(text) => format!("string '{text}'"),
            Token::Number(n) => format!("number {n}"),
            Token::Op(_) => "comparison operator".into(),
            Token::Open => "`(`".into(),
            Token::Close => "`)`".into(),
            Token::Comma => "`,`".into(),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<(Token, usize)>, String> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (offset, c) = chars[i];
        let next = chars.get(i + 1).map(|(_, c)| *c);
        let position = text[..offset].chars().count();
        let (token, width) = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => (Token::Open, 1),
            ')' => (Token::Close, 1),
            ',' => (Token::Comma, 1),
            '=' => (Token::Op(CompareOp::Eq), 1),
            '!' if next == Some('=') => (Token::Op(CompareOp::Ne), 2),
            '<' if next == Some('>') => (Token::Op(CompareOp::Ne), 2),
            '<' if next == Some('=') => (Token::Op(CompareOp::Le), 2),
            '<' => (Token::Op(CompareOp::Lt), 1),
            '>' if next == Some('=') => (Token::Op(CompareOp::Ge), 2),
            '>' => (Token::Op(CompareOp::Gt), 1),
            '\'' | '"' => {
                // 'text' with '' for a quote; "Column Name" with "" for a double quote.
                let mut value = String::new();
                let mut j = i + 1;
                loop {
                    match chars.get(j).map(|(_, c)| *c) {
                        None => {
                            return Err(format!(
                                "the quote opened at character {} is not closed",
                                position + 1
                            ))
                        }
                        Some(q) if q == c => {
                            if chars.get(j + 1).map(|(_, c)| *c) == Some(c) {
                                value.push(c);
                                j += 2;
                            } else {
                                break;
                            }
                        }
                        Some(other) => {
                            value.push(other);
                            j += 1;
                        }
                    }
                }
                let token = if c == '\'' {
                    Token::Text(value)
                } else {
                    Token::Ident(value)
                };
                (token, j + 1 - i)
            }
            c if c.is_ascii_digit()
                || (c == '-' || c == '.') && next.is_some_and(|n| n.is_ascii_digit()) =>
            {
                let mut j = i + 1;
                while chars
                    .get(j)
                    .is_some_and(|(_, c)| c.is_ascii_alphanumeric() || *c == '.')
                {
                    j += 1;
                }
                let literal: String = chars[i..j].iter().map(|(_, c)| c).collect();
                let number = literal
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite())
                    .ok_or_else(|| {
                        format!("`{literal}` at character {} is not a number", position + 1)
                    })?;
                (Token::Number(number), j - i)
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut j = i + 1;
                while chars
                    .get(j)
                    .is_some_and(|(_, c)| c.is_alphanumeric() || *c == '_' || *c == '$')
                {
                    j += 1;
                }
                let word: String = chars[i..j].iter().map(|(_, c)| c).collect();
                let token = match word.to_ascii_lowercase().as_str() {
                    "and" => Token::Word(Keyword::And),
                    "or" => Token::Word(Keyword::Or),
                    "not" => Token::Word(Keyword::Not),
                    "in" => Token::Word(Keyword::In),
                    "is" => Token::Word(Keyword::Is),
                    "null" => Token::Word(Keyword::Null),
                    "true" => Token::Word(Keyword::True),
                    "false" => Token::Word(Keyword::False),
                    _ => Token::Ident(word),
                };
                (token, j - i)
            }
            other => {
                return Err(format!(
                    "unexpected `{other}` at character {}",
                    position + 1
                ))
            }
        };
        tokens.push((token, position));
        i += width;
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(Token, usize)>,
    at: usize,
}

/// Nesting deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 64;

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(t, _)| t)
    }

    fn eat(&mut self, token: &Token) -> bool {
        if self.peek() == Some(token) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expected(&self, what: &str) -> String {
        match self.tokens.get(self.at) {
            Some((token, offset)) => format!(
                "expected {what} at character {}, found {}",
                offset + 1,
                token.describe()
            ),
            None => format!("expected {what} at the end of the filter"),
        }
    }

    fn or(&mut self) -> Result<Expr, String> {
        self.or_at(0)
    }

    fn or_at(&mut self, depth: usize) -> Result<Expr, String> {
        if depth > MAX_DEPTH {
            return Err(format!("the filter nests deeper than {MAX_DEPTH} levels"));
        }
        let mut expr = self.and(depth)?;
        while self.eat(&Token::Word(Keyword::Or)) {
            expr = Expr::Or(Box::new(expr), Box::new(self.and(depth)?));
        }
        Ok(expr)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, String> {
        let mut expr = self.not(depth)?;
        while self.eat(&Token::Word(Keyword::And)) {
            expr = Expr::And(Box::new(expr), Box::new(self.not(depth)?));
        }
        Ok(expr)
    }

    fn not(&mut self, depth: usize) -> Result<Expr, String> {
        let mut negations = 0usize;
        while self.eat(&Token::Word(Keyword::Not)) {
            negations += 1;
        }
        let expr = self.term(depth)?;
        Ok(if negations % 2 == 1 {
            Expr::Not(Box::new(expr))
        } else {
            expr
        })
    }

    fn term(&mut self, depth: usize) -> Result<Expr, String> {
        if self.eat(&Token::Open) {
            let expr = self.or_at(depth + 1)?;
            if !self.eat(&Token::Close) {
                return Err(self.expected("`)`"));
            }
            return Ok(expr);
        }
        let column = match self.peek() {
            Some(Token::Ident(name)) => name.clone(),
            _ => return Err(self.expected("a column name or `(`")),
        };
        self.at += 1;
        match self.peek().cloned() {
            Some(Token::Op(op)) => {
                self.at += 1;
                let literal = self.literal()?;
                Ok(Expr::Compare(column, op, literal))
            }
            Some(Token::Word(Keyword::Is)) => {
                self.at += 1;
                let negated = self.eat(&Token::Word(Keyword::Not));
                if !self.eat(&Token::Word(Keyword::Null)) {
                    return Err(self.expected("`null`"));
                }
                Ok(Expr::IsNull(column, negated))
            }
            Some(Token::Word(Keyword::In)) => {
                self.at += 1;
                self.in_list(column, false)
            }
            Some(Token::Word(Keyword::Not))
                if self.tokens.get(self.at + 1).map(|(t, _)| t)
                    == Some(&Token::Word(Keyword::In)) =>
            {
                self.at += 2;
                self.in_list(column, true)
            }
            _ => Ok(Expr::Column(column)),
        }
    }

    fn in_list(&mut self, column: String, negated: bool) -> Result<Expr, String> {
        if !self.eat(&Token::Open) {
            return Err(self.expected("`(` opening the list"));
        }
        let mut list = vec![self.literal()?];
        while self.eat(&Token::Comma) {
            list.push(self.literal()?);
        }
        if !self.eat(&Token::Close) {
            return Err(self.expected("`,` or `)`"));
        }
        Ok(Expr::In(column, list, negated))
    }

    fn literal(&mut self) -> Result<Literal, String> {
        let literal = match self.peek() {
            Some(Token::Text(s)) => Literal::Text(s.clone()),
            Some(Token::Number(n)) => Literal::Number(*n),
            Some(Token::Word(Keyword::True)) => Literal::Bool(true),
            Some(Token::Word(Keyword::False)) => Literal::Bool(false),
            Some(Token::Word(Keyword::Null)) => {
                return Err(self.expected("a value (compare with NULL by `is null`)"))
            }
            _ => return Err(self.expected("a value ('text', a number, true or false)")),
        };
        self.at += 1;
        Ok(literal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(value: Value) -> Row {
        Row::from_json(value).unwrap()
    }

    fn keeps(filter: &str, value: Value) -> bool {
        Filter::parse(filter).unwrap().keeps(&row(value))
    }

    #[test]
    fn filters_compare_as_sql_does() {
        let r = json!({"region": "eu", "amount": "120.50", "vip": false, "note": null, "n": 3});
        assert!(keeps("region = 'eu'", r.clone()));
        assert!(!keeps("region <> 'eu'", r.clone()));
        assert!(keeps("amount >= 100 and n < 4", r.clone()));
        assert!(keeps("amount > 1000 or not vip", r.clone()));
        assert!(keeps("note is null and region is not null", r.clone()));
        assert!(keeps("n in (1, 2, 3)", r.clone()));
        assert!(keeps("region not in ('us', 'apac')", r.clone()));
        assert!(keeps(
            "(region = 'us' or region = 'eu') and NOT (n = 4)",
            r.clone()
        ));
        // NULL compares unknown: neither `=` nor `<>` keeps the row, nor does NOT of it.
        assert!(!keeps("note = 'x'", r.clone()));
        assert!(!keeps("note <> 'x'", r.clone()));
        assert!(!keeps("not (note = 'x')", r.clone()));
        // A column the row lacks reads as NULL.
        assert!(!keeps("missing = 1", r.clone()));
        // MySQL booleans are 0/1.
        assert!(keeps("flag", json!({"flag": 1})));
        assert!(keeps("\"Odd Name\" = 'x''y'", json!({"Odd Name": "x'y"})));
    }

    #[test]
    fn parse_errors_say_where() {
        let error = |text: &str| Filter::parse(text).unwrap_err();
        assert_eq!(error(""), "the filter is empty");
        assert_eq!(
            error("region = "),
            "expected a value ('text', a number, true or false) at the end of the filter"
        );
        assert_eq!(
            error("region = 'eu' amount"),
            "unexpected column `amount` at character 15"
        );
        assert_eq!(
            error("a = 'x"),
            "the quote opened at character 5 is not closed"
        );
        assert_eq!(
            error("a = null"),
            "expected a value (compare with NULL by `is null`) at character 5, found `null`"
        );
        assert_eq!(error("(a = 1"), "expected `)` at the end of the filter");
        assert_eq!(error("a ~ 1"), "unexpected `~` at character 3");
        assert!(error(&"(".repeat(100)).contains("nests deeper"));
    }

    #[test]
    fn unavailable_values_leave_the_filter_undecided() {
        let transform = TableTransform {
            filters: vec![Filter::parse("body = 'x'").unwrap()],
            ..Default::default()
        };
        let image = row(json!({"id": 1, "body": UNAVAILABLE_VALUE}));
        assert_eq!(transform.verdict(&image), Verdict::Undecided);
        let image = row(json!({"id": 1, "body": "y"}));
        assert_eq!(transform.verdict(&image), Verdict::Reject);
    }

    #[test]
    fn masks_and_drops_shape_the_row() {
        let transform = TableTransform {
            drop_columns: vec!["secret".into()],
            masks: vec![("email".into(), Mask::Hash), ("phone".into(), Mask::Null)],
            filters: vec![],
        };
        let mut image = row(json!({"id": 1, "secret": "s", "email": "a@b", "phone": "1"}));
        transform.shape(&mut image);
        assert_eq!(
            image.into_json(),
            json!({
                "id": 1,
                // printf 'a@b' | sha256sum
                "email": "7508d8b5018ea640b85269861a101203f0c26900555268e930025dac844b0f35",
                "phone": null,
            })
        );
        assert!(transform
            .check_key(&row(json!({"email": "x"})))
            .unwrap_err()
            .contains("`email` is part of the primary key"));
        assert_eq!(Mask::Hash.apply(&json!(12)), Mask::Hash.apply(&json!("12")));
        assert_eq!(Mask::Hash.apply(&json!(null)), json!(null));
    }

    #[test]
    fn filter_parser_never_panics() {
        let seeds: &[&[u8]] = &[
            b"region = 'eu' and (amount >= 100 or vip)",
            b"note is not null and kind not in ('a', 'b', 3)",
            b"\"Quoted\" <> 'it''s' or not flag",
        ];
        let mut mutator = crate::fuzz::Mutator::new(0xf117);
        let image = row(json!({"region": "eu", "amount": 5, "vip": true, "kind": "a"}));
        for _ in 0..20_000 {
            let input = mutator.input(seeds);
            if let Ok(filter) = Filter::parse(&String::from_utf8_lossy(&input)) {
                let _ = filter.keeps(&image);
            }
        }
    }
}
