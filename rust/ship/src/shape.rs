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
