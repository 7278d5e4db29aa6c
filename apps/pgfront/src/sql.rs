//! A small, conservative reading of the SQL text a front-end must recognise.
//!
//! PostgreSQL query strings are bytes (in the client's encoding, not necessarily UTF-8), so
//! everything here works on bytes and compares keywords ASCII case-insensitively. The lexer
//! skips whitespace, `--` line comments and nested `/* */` block comments, and steps over
//! single-quoted strings (`''` escapes), `E''` strings (backslash escapes), double-quoted
//! identifiers and dollar-quoted strings (`$tag$...$tag$`), so keywords and `;` inside them
//! are never seen. Statements are split on `;` outside parentheses and outside the
//! `BEGIN ATOMIC ... END` body of a `CREATE FUNCTION`/`PROCEDURE`, the way psql splits them.
//!
//! Only the text is read: a function, procedure or `DO` block can change settings, take
//! advisory locks or end a transaction without any of it showing here. The transaction state
//! to trust is the one in the backend's ReadyForQuery; an unterminated string or comment runs
//! to the end of the text (PostgreSQL refuses such a query whole, so nothing in it runs).

use smallvec::SmallVec;
use std::borrow::Cow;

/// What a statement's leading keywords say about transactions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TxnControl {
    /// `BEGIN`, `START TRANSACTION`.
    Begin,
    /// `COMMIT`, `END` (also with `WORK`/`TRANSACTION`, or `AND NO CHAIN`).
    Commit,
    /// Ends the transaction some other way: `COMMIT AND CHAIN`, `END AND CHAIN`,
    /// `COMMIT PREPARED`, `ROLLBACK PREPARED`, `PREPARE TRANSACTION`.
    CommitOther,
    /// `ROLLBACK`, `ABORT` (also with `WORK`/`TRANSACTION`, or `AND NO CHAIN`).
    Rollback,
    /// `ROLLBACK AND CHAIN`, `ABORT AND CHAIN`.
    RollbackOther,
    /// Anything else, including `ROLLBACK TO [SAVEPOINT]`, `SAVEPOINT` and `RELEASE`.
    #[default]
    None,
}

/// Classification of one query string (which may hold several `;`-separated statements).
/// The flags err on the side of "yes".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classified {
    /// Non-empty statements in the string.
    pub statements: usize,
    /// Transaction control of the first statement (`None` if there is none).
    pub first: TxnControl,
    /// Some statement is transaction control (anything but [`TxnControl::None`]).
    pub has_txn_control: bool,
    /// Some statement changes session settings or prepared statements: a leading `SET`
    /// (except `SET LOCAL` and `SET TRANSACTION`), `RESET`, `DISCARD`, `PREPARE` (not
    /// `PREPARE TRANSACTION`), `DEALLOCATE` or `LOAD`; or `set_config` appears anywhere.
    pub session_change: bool,
    /// Some statement makes the session unmovable: `CREATE [OR REPLACE] [GLOBAL|LOCAL]
    /// TEMP|TEMPORARY ...` (anywhere, so also under `EXPLAIN ANALYZE`), `SELECT ... INTO
    /// TEMP` (in a statement not led by `INSERT`), `LISTEN`, `DECLARE ... WITH HOLD`, or one
    /// of the session-level advisory lock functions anywhere (`pg_advisory_lock`,
    /// `pg_advisory_lock_shared`, `pg_try_advisory_lock`, `pg_try_advisory_lock_shared`).
    pub pins_session: bool,
    /// Some statement cannot run inside a transaction block: `VACUUM`, `CREATE`/`DROP`
    /// `DATABASE`/`TABLESPACE`/`SUBSCRIPTION`, `ALTER SYSTEM`, `ALTER DATABASE ... SET
    /// TABLESPACE`, `REINDEX DATABASE`/`SYSTEM`/`SCHEMA`, `CLUSTER` without a table,
    /// `DISCARD ALL`, `COMMIT PREPARED`, `ROLLBACK PREPARED`, `ALTER SUBSCRIPTION`, any
    /// statement with the word `CONCURRENTLY`, and `CALL` and `DO` (a procedure or `DO` block
    /// may commit, which it cannot do inside a transaction block).
    pub non_transactional: bool,
    /// `NOTIFY` or `pg_notify` appears anywhere (PREPARE TRANSACTION refuses these).
    pub notify: bool,
    /// The first statement is `COPY ... FROM STDIN` (`Some(true)`) or `COPY ... TO STDOUT`
    /// (`Some(false)`); PostgreSQL takes `STDIN` and `STDOUT` alike, the direction is the
    /// `FROM` or `TO`.
    pub copy: Option<bool>,
}

/// Classifies a query string, with `standard_conforming_strings` on (PostgreSQL's default
/// since 9.1: backslashes are plain characters in `'...'` strings).
pub fn classify(sql: &[u8]) -> Classified {
    classify_with(sql, true)
}

/// Classifies a query string; `standard_conforming_strings` is the session's setting of that
/// name (when off, backslashes escape in every `'...'` string).
pub fn classify_with(sql: &[u8], standard_conforming_strings: bool) -> Classified {
    let toks = lex(sql, standard_conforming_strings);
    let stmts = statements(&toks);
    let mut c = Classified {
        statements: stmts.len(),
        first: stmts.first().map_or(TxnControl::None, |s| txn(s)),
        copy: stmts.first().and_then(|s| copy(s)),
        ..Classified::default()
    };
    for s in &stmts {
        c.has_txn_control |= txn(s) != TxnControl::None;
        c.session_change |= session_change(s);
        c.pins_session |= pins_session(s);
        c.non_transactional |= non_transactional(s);
    }
    // One pass over the words for the names that matter wherever they appear.
    for t in &toks {
        let (word, quoted) = match t {
            Tok::Word(w) => (&w[..], false),
            Tok::Quoted(q) => (&q[..], true),
            _ => continue,
        };
        let is = |name: &str| match quoted {
            true => word == name.as_bytes(),
            false => word.eq_ignore_ascii_case(name.as_bytes()),
        };
        // Every name below is at least 6 bytes long and starts with `s`, `p` or `n`.
        if word.len() < 6 || !matches!(word[0] | 0x20, b's' | b'p' | b'n') {
            continue;
        }
        c.session_change |= is("set_config");
        c.pins_session |= ADVISORY_LOCKS.iter().any(|n| is(n));
        c.notify |= is("pg_notify") || (!quoted && is("notify"));
    }
    c
}

/// The advisory lock functions whose locks outlive the transaction.
const ADVISORY_LOCKS: [&str; 4] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// A token outside strings and comments.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok<'a> {
    /// An unquoted keyword or identifier (compared ASCII case-insensitively).
    Word(&'a [u8]),
    /// A quoted identifier with its escapes undone (compared exactly).
    Quoted(Cow<'a, [u8]>),
    Semi,
    Open,
    Close,
    /// A string, number, parameter or operator character.
    Other,
}

impl Tok<'_> {
    /// Whether this is the unquoted keyword `kw` (given in lower case).
    fn is(&self, kw: &str) -> bool {
        matches!(self, Tok::Word(w) if w.eq_ignore_ascii_case(kw.as_bytes()))
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_cont(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// The position after the whitespace and comments at `i`.
fn skip_blank(s: &[u8], mut i: usize) -> usize {
    loop {
        let rest = &s[i.min(s.len())..];
        if rest.first().is_some_and(|&c| is_space(c)) {
            i += 1;
        } else if rest.starts_with(b"--") {
            i += rest
                .iter()
                .position(|&c| c == b'\n' || c == b'\r')
                .unwrap_or(rest.len());
        } else if rest.starts_with(b"/*") {
            // Block comments nest.
            let (mut depth, mut j) = (1, 2);
            while depth > 0 && j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    (depth, j) = (depth + 1, j + 2);
                } else if rest[j..].starts_with(b"*/") {
                    (depth, j) = (depth - 1, j + 2);
                } else {
                    j += 1;
                }
            }
            i += j.min(rest.len());
        } else {
            return i.min(s.len());
        }
    }
}

/// The end of a `'...'` string whose body starts at `i`; `backslash`: `\` escapes a byte.
fn skip_string(s: &[u8], mut i: usize, backslash: bool) -> usize {
    while i < s.len() {
        match s[i] {
            b'\\' if backslash => i += 2,
            b'\'' if s.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    s.len()
}

/// A `"..."` identifier whose body starts at `i`: its text with `""` undone, and its end.
fn quoted_ident(s: &[u8], i: usize) -> (Cow<'_, [u8]>, usize) {
    let mut j = i;
    let mut doubled = false;
    while j < s.len() {
        if s[j] == b'"' {
            if s.get(j + 1) != Some(&b'"') {
                break;
            }
            (doubled, j) = (true, j + 1);
        }
        j += 1;
    }
    let body = &s[i..j];
    let text = match doubled {
        true => {
            let mut out = Vec::with_capacity(body.len());
            let mut k = 0;
            while k < body.len() {
                out.push(body[k]);
                k += if body[k] == b'"' { 2 } else { 1 };
            }
            Cow::Owned(out)
        }
        false => Cow::Borrowed(body),
    };
    (text, (j + 1).min(s.len()))
}

/// If a dollar quote opens at `i` (`$$` or `$tag$`), the end of the whole string.
fn dollar_string(s: &[u8], i: usize) -> Option<usize> {
    let tag_len = s[i + 1..]
        .iter()
        .take_while(|&&c| ident_cont(c) && c != b'$')
        .count();
    let tag_ok = tag_len == 0 || ident_start(s[i + 1]);
    if !tag_ok || s.get(i + 1 + tag_len) != Some(&b'$') {
        return None;
    }
    let delim = &s[i..i + tag_len + 2];
    let body = i + delim.len();
    let end = s[body..].windows(delim.len()).position(|w| w == delim);
    Some(end.map_or(s.len(), |e| body + e + delim.len()))
}

/// Undoes the escapes of a `U&"..."` identifier: `\XXXX`, `\+XXXXXX` and `\\`, where `\` is
/// `esc`. None if one is invalid (PostgreSQL then refuses the whole query).
fn unicode_ident(text: &[u8], esc: u8) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] != esc {
            out.push(text[i]);
            i += 1;
            continue;
        }
        let (from, n) = match text.get(i + 1) {
            Some(&c) if c == esc => {
                out.push(esc);
                i += 2;
                continue;
            }
            Some(b'+') => (i + 2, 6),
            _ => (i + 1, 4),
        };
        let hex = std::str::from_utf8(text.get(from..from + n)?).ok()?;
        let c = char::from_u32(u32::from_str_radix(hex, 16).ok()?)?;
        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        i = from + n;
    }
    Some(out)
}

/// The escape character a `UESCAPE 'c'` clause at `i` names, if there is one.
fn uescape(s: &[u8], i: usize) -> Option<u8> {
    let i = skip_blank(s, i);
    let word = s.get(i..i + 7)?;
    if !word.eq_ignore_ascii_case(b"uescape") || s.get(i + 7).is_some_and(|&c| ident_cont(c)) {
        return None;
    }
    let i = skip_blank(s, i + 7);
    match s.get(i..i + 3)? {
        [b'\'', c, b'\''] => Some(*c),
        _ => None,
    }
}

/// Tokens of one query string: a typical statement's fit on the stack.
type Toks<'a> = SmallVec<[Tok<'a>; 32]>;

/// The tokens of `s`, strings and comments left out.
fn lex(s: &[u8], scs: bool) -> Toks<'_> {
    let mut toks = Toks::new();
    let mut i = skip_blank(s, 0);
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        let (tok, end) = match c {
            b';' => (Tok::Semi, i + 1),
            b'(' => (Tok::Open, i + 1),
            b')' => (Tok::Close, i + 1),
            b'\'' => (Tok::Other, skip_string(s, i + 1, !scs)),
            b'"' => {
                let (text, end) = quoted_ident(s, i + 1);
                (Tok::Quoted(text), end)
            }
            b'$' => (Tok::Other, dollar_string(s, i).unwrap_or(i + 1)),
            b'e' | b'E' if next == Some(b'\'') => (Tok::Other, skip_string(s, i + 2, true)),
            b'u' | b'U' if next == Some(b'&') && s.get(i + 2) == Some(&b'"') => {
                let (text, end) = quoted_ident(s, i + 3);
                let esc = uescape(s, end).unwrap_or(b'\\');
                let tok = unicode_ident(&text, esc).map_or(Tok::Other, |t| Tok::Quoted(t.into()));
                (tok, end)
            }
            c if ident_start(c) => {
                let n = s[i..].iter().take_while(|&&c| ident_cont(c)).count();
                (Tok::Word(&s[i..i + n]), i + n)
            }
            // Numbers with whatever letters follow them; never a keyword.
            b'0'..=b'9' => {
                let n = s[i..]
                    .iter()
                    .take_while(|&&c| c.is_ascii_alphanumeric() || c == b'_');
                (Tok::Other, i + n.count())
            }
            _ => (Tok::Other, i + 1),
        };
        toks.push(tok);
        i = skip_blank(s, end);
    }
    toks
}

/// Whether `stmt` starts `CREATE [OR REPLACE] FUNCTION|PROCEDURE`.
fn is_routine(stmt: &[Tok]) -> bool {
    let at = |i: usize, kw| stmt.get(i).is_some_and(|t| t.is(kw));
    let routine = |i| at(i, "function") || at(i, "procedure");
    at(0, "create") && (routine(1) || (at(1, "or") && at(2, "replace") && routine(3)))
}

/// The non-empty statements of `toks`.
fn statements<'t, 'a>(toks: &'t [Tok<'a>]) -> SmallVec<[&'t [Tok<'a>]; 2]> {
    let mut out = SmallVec::new();
    let (mut start, mut parens, mut atomic) = (0, 0usize, 0usize);
    // Whether the statement from `start` is a routine (asked once per statement).
    let mut routine = is_routine(toks);
    for (i, t) in toks.iter().enumerate() {
        match t {
            Tok::Open => parens += 1,
            Tok::Close => parens = parens.saturating_sub(1),
            Tok::Semi if parens == 0 && atomic == 0 => {
                if i > start {
                    out.push(&toks[start..i]);
                }
                start = i + 1;
                routine = is_routine(&toks[start..]);
            }
            Tok::Word(_) if parens == 0 && routine => {
                // A SQL-standard body: BEGIN ATOMIC ... END, with CASE ... END inside.
                let begin_atomic = t.is("begin") && toks.get(i + 1).is_some_and(|t| t.is("atomic"));
                if begin_atomic || (t.is("case") && atomic > 0) {
                    atomic += 1;
                } else if t.is("end") {
                    atomic = atomic.saturating_sub(1);
                }
            }
            _ => {}
        }
    }
    if toks.len() > start {
        out.push(&toks[start..]);
    }
    out
}

/// Whether token `i` of `st` is the keyword `kw`.
fn at(st: &[Tok], i: usize, kw: &str) -> bool {
    st.get(i).is_some_and(|t| t.is(kw))
}

/// Whether the words `a b` appear next to each other in `st`.
fn pair(st: &[Tok], a: &str, b: &str) -> bool {
    (0..st.len()).any(|i| at(st, i, a) && at(st, i + 1, b))
}

/// The position after a parenthesized option list at `i`, if there is one.
fn skip_options(st: &[Tok], i: usize) -> usize {
    if st.get(i) != Some(&Tok::Open) {
        return i;
    }
    let mut depth = 0usize;
    for (j, t) in st.iter().enumerate().skip(i) {
        match t {
            Tok::Open => depth += 1,
            Tok::Close if depth == 1 => return j + 1,
            Tok::Close => depth -= 1,
            _ => {}
        }
    }
    st.len()
}

fn txn(st: &[Tok]) -> TxnControl {
    use TxnControl::*;
    let work = |i| at(st, i, "work") || at(st, i, "transaction");
    let after = if work(1) { 2 } else { 1 };
    let chain = at(st, after, "and") && !at(st, after + 1, "no");
    if at(st, 0, "begin") || (at(st, 0, "start") && at(st, 1, "transaction")) {
        Begin
    } else if at(st, 0, "commit") || at(st, 0, "end") {
        match chain || at(st, 1, "prepared") {
            true => CommitOther,
            false => Commit,
        }
    } else if at(st, 0, "rollback") || at(st, 0, "abort") {
        match () {
            _ if at(st, after, "to") => None,
            _ if at(st, 1, "prepared") => CommitOther,
            _ if chain => RollbackOther,
            _ => Rollback,
        }
    } else if at(st, 0, "prepare") && at(st, 1, "transaction") {
        CommitOther
    } else {
        None
    }
}

fn session_change(st: &[Tok]) -> bool {
    (at(st, 0, "set") && !at(st, 1, "local") && !at(st, 1, "transaction"))
        || (at(st, 0, "prepare") && !at(st, 1, "transaction"))
        || ["reset", "discard", "deallocate", "load"]
            .iter()
            .any(|kw| at(st, 0, kw))
}

/// Whether `[GLOBAL|LOCAL] TEMP|TEMPORARY` follows at `i`.
fn temp_at(st: &[Tok], i: usize) -> bool {
    let i = if at(st, i, "global") || at(st, i, "local") {
        i + 1
    } else {
        i
    };
    at(st, i, "temp") || at(st, i, "temporary")
}

fn pins_session(st: &[Tok]) -> bool {
    let create_temp = (0..st.len()).any(|i| {
        let or_replace = at(st, i + 1, "or") && at(st, i + 2, "replace");
        let j = if or_replace { i + 3 } else { i + 1 };
        at(st, i, "create") && temp_at(st, j)
    });
    let into_temp =
        !at(st, 0, "insert") && (0..st.len()).any(|i| at(st, i, "into") && temp_at(st, i + 1));
    create_temp
        || into_temp
        || at(st, 0, "listen")
        || (at(st, 0, "declare") && pair(st, "with", "hold"))
}

fn non_transactional(st: &[Tok]) -> bool {
    let object = |kws: &[&str]| kws.iter().any(|kw| at(st, 1, kw));
    let first = |kw| at(st, 0, kw);
    first("vacuum")
        || ((first("create") || first("drop"))
            && object(&["database", "tablespace", "subscription"]))
        || (first("alter") && (at(st, 1, "system") || at(st, 1, "subscription")))
        || first("call")
        || first("do")
        || (first("alter") && at(st, 1, "database") && pair(st, "set", "tablespace"))
        || (first("reindex")
            && ["database", "system", "schema"]
                .iter()
                .any(|kw| at(st, skip_options(st, 1), kw)))
        || (first("cluster") && {
            let i = skip_options(st, 1);
            i + usize::from(at(st, i, "verbose")) >= st.len()
        })
        || (first("discard") && at(st, 1, "all"))
        || ((first("commit") || first("rollback")) && at(st, 1, "prepared"))
        || st.iter().any(|t| t.is("concurrently"))
}

/// `Some(true)` for `COPY ... FROM STDIN`, `Some(false)` for `COPY ... TO STDOUT`.
fn copy(st: &[Tok]) -> Option<bool> {
    if !at(st, 0, "copy") {
        return None;
    }
    let mut depth = 0usize;
    for (i, t) in st.iter().enumerate() {
        match t {
            Tok::Open => depth += 1,
            Tok::Close => depth = depth.saturating_sub(1),
            _ if depth == 0 && (at(st, i + 1, "stdin") || at(st, i + 1, "stdout")) => {
                if t.is("from") {
                    return Some(true);
                } else if t.is("to") {
                    return Some(false);
                }
            }
            _ => {}
        }
    }
    None
}

/// The command tag of `sql` if it is a plain `BEGIN`, `BEGIN WORK`, `BEGIN TRANSACTION` or
/// `START TRANSACTION` (any case, surrounding white space, one optional `;`, nothing else: no
/// comment, no transaction mode): a statement PostgreSQL runs without fail at Idle, so the
/// front-end may answer it before it runs (decision 68).
pub fn plain_begin(sql: &[u8]) -> Option<&'static str> {
    let s = std::str::from_utf8(sql).ok()?.trim();
    let s = s.strip_suffix(';').unwrap_or(s);
    let mut words = s.split_ascii_whitespace();
    let tag = match (words.next(), words.next(), words.next()) {
        (Some(a), None, None) if a.eq_ignore_ascii_case("begin") => "BEGIN",
        (Some(a), Some(b), None)
            if a.eq_ignore_ascii_case("begin")
                && (b.eq_ignore_ascii_case("work") || b.eq_ignore_ascii_case("transaction")) =>
        {
            "BEGIN"
        }
        (Some(a), Some(b), None)
            if a.eq_ignore_ascii_case("start") && b.eq_ignore_ascii_case("transaction") =>
        {
            "START TRANSACTION"
        }
        _ => return None,
    };
    Some(tag)
}

#[cfg(test)]
mod tests;
