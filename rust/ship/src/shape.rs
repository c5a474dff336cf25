//! The shape of a query text: the text with every literal constant replaced by `?`, read
//! with PostgreSQL's scanner (libpg_query).  Two texts of the same shape name the same
//! operations and the same tables (`SELECT abalance FROM pgbench_accounts WHERE aid = 1`
//! and `... aid = 2`), so their analysis can be shared; identifiers, keywords, operators
//! and comments are kept exactly, so texts naming different tables never share it.

use pg_query::protobuf::Token;

fn is_constant(token: Token) -> bool {
    matches!(
        token,
        Token::Iconst
            | Token::Fconst
            | Token::Sconst
            | Token::Usconst
            | Token::Bconst
            | Token::Xconst
    )
}

/// The shape of `sql`; None when the scanner rejects it (an unterminated quote, say).
pub fn query_shape(sql: &str) -> Option<String> {
    shape_and_literals(sql).map(|(shape, _)| shape)
}

/// The shape of `sql` and whether it had any literal (a text without literals is its own
/// shape's only spelling with this spacing).
pub fn shape_and_literals(sql: &str) -> Option<(String, bool)> {
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut out = String::with_capacity(sql.len());
    let mut literals = false;
    for token in tokens {
        if !out.is_empty() {
            out.push(' ');
        }
        let start = usize::try_from(token.start).ok()?;
        let end = usize::try_from(token.end).ok()?;
        if is_constant(token.token()) {
            out.push('?');
            literals = true;
        } else {
            out.push_str(sql.get(start..end)?);
        }
    }
    Some((out, literals))
}

/// A key under which texts that differ only in their numbers share one analysis, found
/// without running the scanner: each run of ASCII digits that begins a token becomes `?`.
///
/// A run begins a token when the byte before it cannot continue a name or a parameter (a
/// letter, digit, `_`, `$` or a non-ASCII byte): in PostgreSQL's grammar such a run is a
/// numeric constant (`aid = 42`, `LIMIT 10`, `1.5e3`), or lies inside a string, a comment
/// or a dollar-quoted body, which are constants or nothing to an analysis.  Digits in
/// names (`orders_2024_01`) and parameters (`$1`) are kept.  The one place digits can
/// begin a name is a quoted identifier (`"2024"`): a text with a double quote gets no key.
pub fn number_blind_key(sql: &str) -> Option<String> {
    let bytes = sql.as_bytes();
    if bytes.contains(&b'"') {
        return None;
    }
    let continues_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() && (i == 0 || !continues_name(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            out.push_str(&sql[copied..start]); // ASCII boundaries: always char boundaries
            out.push('?');
            copied = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&sql[copied..]);
    Some(out)
}

/// libpg_query's normalisation: every literal replaced by a `$n` placeholder.
pub fn sanitise(sql: &str) -> Option<String> {
    pg_query::normalize(sql).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_do_not_change_the_shape() {
        let a = query_shape("SELECT abalance FROM pgbench_accounts WHERE aid = 45871;").unwrap();
        let b = query_shape("select abalance from pgbench_accounts where aid = 7").unwrap();
        let c = query_shape("SELECT abalance FROM pgbench_accounts WHERE aid = 7;").unwrap();
        assert_eq!(a, c);
        assert_ne!(a, b, "keywords are kept as written");
        assert_eq!(
            query_shape("select 'x''y', 1.5, x'ff', b'01', E'\\n' from t").unwrap(),
            "select ? , ? , ? , ? , ? from t"
        );
    }

    #[test]
    fn identifiers_are_kept_exactly() {
        // libpg_query's fingerprint ignores numeric suffixes of table names; shapes must not.
        assert_ne!(
            query_shape("SELECT * FROM orders_2024_01"),
            query_shape("SELECT * FROM orders_2024_02")
        );
        assert_ne!(
            query_shape("SELECT * FROM \"T\""),
            query_shape("SELECT * FROM t")
        );
        assert_ne!(
            query_shape("SELECT $1 FROM a -- x\n"),
            query_shape("SELECT $1 FROM b -- x\n")
        );
    }

    #[test]
    fn dollar_quoted_bodies_are_literals() {
        assert_eq!(
            query_shape("DO $$ BEGIN PERFORM 1; END $$").unwrap(),
            query_shape("DO $x$ BEGIN DROP TABLE t; END $x$").unwrap()
        );
    }

    #[test]
    fn number_blind_keys_keep_names_and_parameters() {
        let key = |s| number_blind_key(s).unwrap();
        assert_eq!(
            key("SELECT abalance FROM pgbench_accounts WHERE aid = 45871;"),
            key("SELECT abalance FROM pgbench_accounts WHERE aid = 7;")
        );
        assert_eq!(
            key("select 1.5e3, x FROM t2 LIMIT 10"),
            "select ?.?e3, x FROM t2 LIMIT ?"
        );
        assert_ne!(
            key("SELECT * FROM orders_2024_01"),
            key("SELECT * FROM orders_2024_02")
        );
        assert_ne!(key("SELECT $1 FROM t"), key("SELECT $2 FROM t"));
        assert_ne!(key("SELECT * FROM täble1"), key("SELECT * FROM täble2"));
        assert_eq!(number_blind_key("SELECT * FROM \"2024\""), None);
    }

    #[test]
    fn texts_with_one_number_blind_key_have_one_shape() {
        // What sharing an analysis by the number-blind key relies on, checked against
        // PostgreSQL's scanner: numbers are replaced where they are constants.  (Shapes
        // keep comments, which the key does not: texts differing only in a comment's
        // digits share a key but not a shape, and nothing in their analysis.)
        let texts = [
            "SELECT * FROM t WHERE a = 12 AND b = 'x 34' LIMIT 7",
            "SELECT * FROM t WHERE a = 3 AND b = 'x 9' LIMIT 70",
            "select 1.25, .5, 6e-7, 8::numeric(10,2) from u where id in (1, 22, 333)",
            "select 9.5, .1, 2e-3, 4::numeric(1,9) from u where id in (7, 8, 9)",
            "DO $$ BEGIN PERFORM 1; END $$",
            "DO $$ BEGIN PERFORM 2; END $$",
        ];
        for a in texts {
            for b in texts {
                if number_blind_key(a) == number_blind_key(b) {
                    assert_eq!(query_shape(a), query_shape(b), "{a:?} / {b:?}");
                }
            }
        }
    }

    #[test]
    fn unterminated_text_has_no_shape() {
        assert!(query_shape("SELECT 'abc").is_none());
    }

    #[test]
    fn sanitised_text_has_placeholders() {
        assert_eq!(
            sanitise("select 'card-4111' as pan, 42 as n").unwrap(),
            "select $1 as pan, $2 as n"
        );
    }
}
