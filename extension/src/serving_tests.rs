//! SQL-level tests of what one session or role may take from the model server: a batch call
//! nobody reads further (a LIMIT, an idle cursor) stops computing, and a login role holds at
//! most its share of the server's connections while other roles are served.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::sql_tests::tests::{assert_error, self_connection, status_value, use_fixture, use_fixture_exclusively};

    /// 20,000 short texts (~200,000 tokens, within nvembed.max_request_tokens): cheap on the
    /// tiny model, yet many passes' worth of rows.
    const TEXTS: &str = "ARRAY(SELECT 'passage number ' || g FROM generate_series(1, 20000) g)";

    /// The server's count of embedded tokens once it stops moving (what was in flight for a
    /// call that ended has finished or been dropped).
    fn settled_tokens() -> i64 {
        let mut last: i64 = status_value("tokens").parse().unwrap();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now: i64 = status_value("tokens").parse().unwrap();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    #[pg_test]
    fn a_limit_or_an_idle_cursor_stops_the_compute_of_a_batch_call() {
        use_fixture_exclusively();
        let before = settled_tokens();
        let all = Spi::get_one::<i64>(&format!("SELECT count(*) FROM nvembed_passages({TEXTS})")).unwrap();
        assert_eq!(all, Some(20_000));
        let every_row = settled_tokens() - before;
        // The server computes at most one pass beyond what a backend read, which is at most the
        // pass before (README, "Serving"): two passes of at most nvembed.max_batch_tokens
        // padded tokens.
        let pass: i64 = Spi::get_one::<String>("SELECT current_setting('nvembed.max_batch_tokens')")
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        let ahead = 2 * pass;
        assert!(every_row > 4 * ahead, "the test's call is too small to show anything ({every_row} tokens)");
        let texts: Vec<String> = (1..=20_000).map(|g| format!("passage number {g}")).collect();
        let at_most_three = |form: &str, sql: &str, with_texts: bool| {
            let before = settled_tokens();
            let rows = if with_texts {
                Spi::get_one_with_args::<i64>(sql, &[texts.clone().into()]).unwrap()
            } else {
                Spi::get_one::<i64>(sql).unwrap()
            };
            assert_eq!(rows, Some(3), "{form}");
            let spent = settled_tokens() - before;
            assert!(spent <= ahead, "{form}: {spent} of {every_row} tokens computed for 3 rows");
        };
        // The forms the README documents for reading part of a call. In FROM, with the texts
        // as a parameter (as drivers send them) the function is inlined.
        at_most_three("FROM with a parameter", "SELECT count(*) FROM (SELECT * FROM nvembed_passages($1) LIMIT 3) s", true);
        at_most_three(
            "FROM nvembed_queries with a parameter",
            "SELECT count(*) FROM (SELECT * FROM nvembed_queries($1[1:8000], 'Given a claim, find evidence') LIMIT 3) s",
            true,
        );
        at_most_three(
            "LATERAL over a sub-select",
            &format!("SELECT count(*) FROM (SELECT e FROM (SELECT {TEXTS} AS t) a, LATERAL nvembed_passages(a.t) e LIMIT 3) s"),
            false,
        );
        at_most_three(
            "numbered in the target list",
            &format!("SELECT count(*) FROM (SELECT generate_series(1, 20000) AS n, nvembed_passages({TEXTS}) AS e LIMIT 3) s"),
            false,
        );
        // A cursor that fetched one row and waits: only a little is computed ahead of it.
        let before = settled_tokens();
        Spi::run(&format!("DECLARE idle NO SCROLL CURSOR FOR SELECT nvembed_passages({TEXTS})")).unwrap();
        Spi::run("FETCH 1 FROM idle").unwrap();
        let spent = settled_tokens() - before;
        assert!(spent <= ahead, "an idle cursor: {spent} of {every_row} tokens computed after FETCH 1");
        // Reading on gets every other row.
        let rest = Spi::connect(|client| client.select("FETCH ALL FROM idle", None, &[]).map(|rows| rows.len())).unwrap();
        assert_eq!(rest, 19_999);
        Spi::run("CLOSE idle").unwrap();
        // NULL in, no rows out, as before.
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM nvembed_passages(NULL)").unwrap(), Some(0));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM nvembed_queries(ARRAY['a'], NULL)").unwrap(), Some(0));
    }

    /// Runs `statement` in its own committed transaction.
    fn autonomous(statement: &str) {
        Spi::run("CREATE EXTENSION IF NOT EXISTS dblink").unwrap();
        Spi::run_with_args("SELECT dblink_exec($1, $2)", &[self_connection().into(), statement.into()]).unwrap();
    }

    #[pg_test]
    fn a_role_holds_at_most_its_calls_and_other_roles_are_served() {
        use_fixture();
        autonomous("DROP ROLE IF EXISTS nvembed_cursor_role");
        autonomous("CREATE ROLE nvembed_cursor_role LOGIN");
        autonomous("ALTER ROLE nvembed_cursor_role SET nvembed.max_calls_per_role = 2");
        let connection = format!("{} user=nvembed_cursor_role", self_connection().replace(" user=postgres", ""));
        Spi::run_with_args("SELECT dblink_connect('capped', $1)", &[connection.into()]).unwrap();
        let remote = |sql: &str| Spi::run_with_args("SELECT dblink_exec('capped', $1)", &[sql.into()]).unwrap();
        remote("BEGIN");
        let rows = |sql: &str| {
            Spi::get_one_with_args::<i64>("SELECT count(*) FROM dblink('capped', $1) AS t(e real[])", &[sql.into()])
                .unwrap()
                .unwrap()
        };
        let fetch_one = |cursor: &str| assert_eq!(rows(&format!("FETCH 1 FROM {cursor}")), 1);
        for cursor in ["a", "b"] {
            remote(&format!("DECLARE {cursor} CURSOR FOR SELECT nvembed_passages({TEXTS})"));
            fetch_one(cursor);
        }
        // The role's third call is refused, with what to do about it.
        let refused = "DO $t$ DECLARE m text; h text; BEGIN
               PERFORM dblink_exec('capped', 'SELECT nvembed_query(''a third call'')');
               RAISE EXCEPTION 'no error raised';
             EXCEPTION WHEN too_many_connections THEN
               GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, h = PG_EXCEPTION_HINT;
               IF m <> 'nvembed: role \"nvembed_cursor_role\" already holds 2 model server connections, its limit (nvembed.max_calls_per_role = 2)'
                  OR position('ALTER ROLE ... SET nvembed.max_calls_per_role' in h) = 0 THEN
                 RAISE EXCEPTION '% / %', m, h;
               END IF;
             END $t$";
        Spi::run(refused).unwrap();
        // Meanwhile other roles are served.
        let vector = Spi::get_one::<i32>("SELECT array_length(nvembed_query('another role'), 1)").unwrap();
        assert_eq!(vector, Some(32));
        // Closing a cursor gives the connection back.
        remote("ROLLBACK");
        remote("BEGIN");
        remote(&format!("DECLARE a CURSOR FOR SELECT nvembed_passages({TEXTS})"));
        fetch_one("a");
        assert_eq!(rows("SELECT nvembed_query('now a second call')"), 1);
        remote("ROLLBACK");
        Spi::run("SELECT dblink_disconnect('capped')").unwrap();
        // Only a superuser sets the limit, so a role cannot raise its own.
        Spi::run("SET ROLE nvembed_cursor_role").unwrap();
        assert_error(
            "SET nvembed.max_calls_per_role = 100",
            "42501",
            "permission denied to set parameter \"nvembed.max_calls_per_role\"",
        );
        Spi::run("RESET ROLE").unwrap();
        autonomous("DROP ROLE nvembed_cursor_role");
    }
}
