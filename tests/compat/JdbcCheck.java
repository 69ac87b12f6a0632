// Compatibility driver for pgJDBC against rlsgate (run by tests/compat.rs via run.sh):
//   java -cp /usr/share/java/postgresql.jar tests/compat/JdbcCheck.java
//
// Environment: PGHOST, PGPORT, PGDATABASE, PGUSER, PGSSLMODE, TOKEN_NORTH, TOKEN_SOUTH (passwords),
// COMPAT_CLIENTS (concurrent connections, default 10), COMPAT_DIR (scratch dir, unused here).
// Optional, for running directly against Postgres without the proxy: COMPAT_USER_NORTH /
// COMPAT_USER_SOUTH (user names per tenant, default PGUSER), COMPAT_DEADLINE (seconds, default 50).
//
// Prints one JSON line per feature on stdout:
//   {"driver": "jdbc", "feature": ..., "ok": ..., "detail": ...}
// Exit status 0 once the features ran (whatever their outcome), 2 when nothing could run.
//
// The URL carries prepareThreshold=1, so every PreparedStatement is a named server-side statement
// from its first execution on.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeSet;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.TimeUnit;

import org.postgresql.PGConnection;
import org.postgresql.PGStatement;

public class JdbcCheck {
    static final String DRIVER = "jdbc";
    static final String[] FEATURES = {
        "prepared", "session_settings", "cancel", "temp_table", "error_in_transaction", "isolation", "pipeline",
    };
    static final int PREPARED_RUNS = 25;
    static final long[] CANCEL_DELAYS_MS = {500, 1000}; // clients 0 (north) and 1 (south)

    static String host, database, user, sslmode;
    static int port, clients;
    static double deadlineSeconds;
    static final Map<String, String> TOKENS = new LinkedHashMap<>();
    static final Map<String, String> USERS = new LinkedHashMap<>();
    static final long START = System.nanoTime();

    // ---------------------------------------------------------------------------------------------
    // Results
    // ---------------------------------------------------------------------------------------------

    record Item(String who, boolean ok, String detail) {}

    static final Map<String, List<Item>> RESULTS = new LinkedHashMap<>();

    static synchronized void record(String feature, String who, boolean ok, String detail) {
        RESULTS.get(feature).add(new Item(who, ok, detail));
    }

    static synchronized String[] summary(String feature, int expected) {
        List<Item> items = new ArrayList<>(RESULTS.get(feature));
        List<Item> failed = new ArrayList<>();
        for (Item i : items) if (!i.ok()) failed.add(i);
        if (!failed.isEmpty()) {
            StringBuilder sb = new StringBuilder();
            sb.append(failed.size()).append('/').append(items.size()).append(" failed: ");
            for (int k = 0; k < Math.min(3, failed.size()); k++) {
                if (k > 0) sb.append("; ");
                sb.append(failed.get(k).who()).append(": ").append(failed.get(k).detail());
            }
            if (failed.size() > 3) sb.append(" (+").append(failed.size() - 3).append(" more)");
            return new String[] {"false", cut(sb.toString())};
        }
        if (items.size() < expected) {
            return new String[] {"false", "only " + items.size() + " of " + expected
                + " connections finished this before the deadline of " + secs(deadlineSeconds) + "s"};
        }
        if (feature.equals("isolation")) {
            int total = 0;
            for (Item i : items) total += Integer.parseInt(i.detail().split(" ")[0]);
            String extra = NOTES.isEmpty() ? "" : "; " + String.join("; ", NOTES.subList(0, Math.min(3, NOTES.size())));
            return new String[] {"true", cut(items.size() + " connections, " + total
                + " tenant checks: each saw only its own tenant (north 3 customers, south 2)" + extra)};
        }
        TreeSet<String> details = new TreeSet<>();
        for (Item i : items) details.add(i.detail());
        List<String> first = new ArrayList<>(details).subList(0, Math.min(3, details.size()));
        return new String[] {"true", cut(items.size() + "/" + items.size() + " ok: " + String.join("; ", first))};
    }

    static String secs(double s) {
        return s == Math.rint(s) ? String.valueOf((long) s) : String.valueOf(s);
    }

    static String cut(String s) {
        return s.length() > 600 ? s.substring(0, 600) : s;
    }

    static String json(String s) {
        StringBuilder sb = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> sb.append("\\\"");
                case '\\' -> sb.append("\\\\");
                case '\n' -> sb.append("\\n");
                case '\r' -> sb.append("\\r");
                case '\t' -> sb.append("\\t");
                default -> {
                    if (c < 0x20) sb.append(String.format("\\u%04x", (int) c));
                    else sb.append(c);
                }
            }
        }
        return sb.append('"').toString();
    }

    static final class Check extends Exception {
        private static final long serialVersionUID = 1L;

        Check(String msg) {
            super(msg);
        }
    }

    static void check(boolean cond, String msg) throws Check {
        if (!cond) throw new Check(msg);
    }

    static String describe(Throwable t) {
        if (t instanceof Check) return t.getMessage();
        String msg = String.valueOf(t.getMessage()).split("\n")[0];
        if (t instanceof SQLException e && e.getSQLState() != null) return e.getSQLState() + ": " + msg;
        return t.getClass().getSimpleName() + ": " + msg;
    }

    interface Body {
        String run() throws Exception;
    }

    static void feature(String name, String who, Body body) {
        try {
            record(name, who, true, body.run());
        } catch (Throwable t) {
            record(name, who, false, describe(t));
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Connections and the tenant check
    // ---------------------------------------------------------------------------------------------

    static Connection connect(String tenant) throws SQLException {
        String url = "jdbc:postgresql://" + host + ":" + port + "/" + database
            + "?prepareThreshold=1&sslmode=" + sslmode + "&connectTimeout=10";
        Properties props = new Properties();
        props.setProperty("user", USERS.get(tenant));
        props.setProperty("password", TOKENS.get(tenant));
        Connection conn = DriverManager.getConnection(url, props);
        conn.setAutoCommit(true);
        return conn;
    }

    static int expectedCustomers(String tenant) {
        return tenant.equals("north") ? 3 : 2;
    }

    static String checkTenant(Connection conn, String tenant, String where) throws SQLException {
        try (Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery(
                 "SELECT count(*), coalesce(string_agg(DISTINCT store_id, ','), '') FROM customers")) {
            rs.next();
            int n = rs.getInt(1);
            String stores = rs.getString(2);
            if (n != expectedCustomers(tenant) || !stores.equals(tenant)) {
                return where + ": saw " + n + " customers of stores '" + stores + "', expected "
                    + expectedCustomers(tenant) + " of '" + tenant + "'";
            }
            return null;
        }
    }

    static final class Counter {
        int checks = 0;
        final List<String> problems = new ArrayList<>();
        final List<String> reconnects = new ArrayList<>();
    }

    static final List<String> NOTES = new ArrayList<>(); // connections replaced after a feature broke them

    /** The connection, or a new one when a feature left it broken (so later features still run). */
    static Connection usable(Connection conn, String tenant, String where, Counter counter) throws SQLException {
        try {
            queryString(conn, "SELECT 1");
            return conn;
        } catch (SQLException e) {
            counter.reconnects.add(where);
            try {
                conn.close();
            } catch (SQLException ignored) {
                // already broken
            }
            return connect(tenant);
        }
    }

    /** Tenant check after a feature; returns the connection to go on with. */
    static Connection isolation(Connection conn, String tenant, String where, Counter counter) {
        counter.checks++;
        String problem;
        try {
            conn = usable(conn, tenant, where, counter);
            problem = checkTenant(conn, tenant, where);
        } catch (Throwable t) {
            problem = where + ": " + describe(t);
        }
        if (problem != null) counter.problems.add(problem);
        return conn;
    }

    static String queryString(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getString(1);
        }
    }

    static SQLException expectError(Connection conn, String sql, String state, String what) throws Check {
        try (Statement st = conn.createStatement()) {
            st.execute(sql);
        } catch (SQLException e) {
            check(state.equals(e.getSQLState()), what + ": expected " + state + ", got " + describe(e));
            return e;
        }
        throw new Check(what + " did not fail");
    }

    // ---------------------------------------------------------------------------------------------
    // Features
    // ---------------------------------------------------------------------------------------------

    static String doPrepared(Connection conn, String tenant) throws Exception {
        int[] ids = tenant.equals("north") ? new int[] {1, 2, 3} : new int[] {4, 5};
        int runs = 0;
        boolean serverPrepared = true;
        try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM customers WHERE customer_id <= ?")) {
            for (int k = 0; k < PREPARED_RUNS; k++) {
                int v = k % 7;
                int expected = 0;
                for (int id : ids) if (id <= v) expected++;
                int times = (k % 5 == 4) ? 2 : 1;
                if (times == 2) conn.setAutoCommit(false); // two executions in one explicit transaction
                boolean finished = false;
                try {
                    for (int t = 0; t < times; t++) {
                        ps.setInt(1, v);
                        try (ResultSet rs = ps.executeQuery()) {
                            rs.next();
                            runs++;
                            int got = rs.getInt(1);
                            check(got == expected, "run " + runs + ": count for id <= " + v + " is " + got + ", expected " + expected);
                        }
                        serverPrepared &= ps.unwrap(PGStatement.class).isUseServerPrepare();
                    }
                    if (times == 2) {
                        if (k % 10 == 9) conn.rollback();
                        else conn.commit();
                    }
                    finished = true;
                } finally {
                    if (times == 2) {
                        if (!finished) {
                            try {
                                conn.rollback();
                            } catch (SQLException ignored) {
                                // the failure that got us here is what gets reported
                            }
                        }
                        conn.setAutoCommit(true);
                    }
                }
            }
        }
        check(serverPrepared, "PreparedStatement did not switch to a server-side statement (isUseServerPrepare false)");
        return runs + " executions of a PreparedStatement as a named server statement (prepareThreshold=1; autocommit,"
            + " committed and rolled-back transactions), all correct";
    }

    static String doSessionSettings(Connection conn, String tenant) throws Exception {
        // Leak check: this client has not set anything yet, so it must not see other clients' settings.
        String before = queryString(conn, "SHOW statement_timeout");
        check(!before.equals("4321ms"), "before SET: saw statement_timeout=" + before + " (another client's setting leaked)");
        try (Statement st = conn.createStatement()) {
            st.execute("SET statement_timeout = '4321ms'");
            st.execute("SET search_path = public");
            st.execute("SET TimeZone = 'Asia/Tokyo'");
        }
        for (int rnd = 0; rnd < 3; rnd++) {
            checkTenant(conn, tenant, "between");
            String got = queryString(conn, "SHOW statement_timeout");
            check(got.equals("4321ms"), "round " + rnd + ": SHOW statement_timeout = " + got + ", expected 4321ms");
            got = queryString(conn, "SHOW TimeZone");
            check(got.equals("Asia/Tokyo"), "round " + rnd + ": SHOW TimeZone = " + got + ", expected Asia/Tokyo");
            got = queryString(conn, "SHOW search_path");
            check(got.equals("public"), "round " + rnd + ": SHOW search_path = " + got + ", expected public");
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT current_setting('TimeZone'), current_setting('statement_timeout')")) {
                rs.next();
                String tz = rs.getString(1), stmo = rs.getString(2);
                check(tz.equals("Asia/Tokyo") && stmo.equals("4321ms"),
                    "round " + rnd + ": in a transaction block saw " + tz + ", " + stmo);
            } finally {
                conn.commit();
                conn.setAutoCommit(true);
            }
        }
        String status = conn.unwrap(PGConnection.class).getParameterStatus("TimeZone");
        check("Asia/Tokyo".equals(status), "client-side ParameterStatus TimeZone = " + status + ", expected Asia/Tokyo");
        return "SHOW in 9 later transactions and getParameterStatus(\"TimeZone\") as set";
    }

    static final ScheduledExecutorService TIMER = Executors.newScheduledThreadPool(2, r -> {
        Thread t = new Thread(r, "canceller");
        t.setDaemon(true);
        return t;
    });

    static String doCancel(Connection conn, long delayMs, boolean prepared) throws Exception {
        Statement st = prepared ? conn.prepareStatement("SELECT pg_sleep(?)") : conn.createStatement();
        long t0 = System.nanoTime();
        ScheduledFuture<?> canceller = TIMER.schedule(() -> {
            try {
                st.cancel();
            } catch (SQLException e) {
                System.err.println("jdbc: Statement.cancel() failed: " + e);
            }
        }, delayMs, TimeUnit.MILLISECONDS);
        SQLException err = null;
        try {
            if (prepared) {
                PreparedStatement ps = (PreparedStatement) st;
                ps.setInt(1, 10);
                ps.executeQuery().close();
            } else {
                st.executeQuery("SELECT pg_sleep(10)").close();
            }
        } catch (SQLException e) {
            err = e;
        } finally {
            canceller.cancel(false);
            st.close();
        }
        double elapsed = (System.nanoTime() - t0) / 1e9;
        check(err != null, String.format("pg_sleep(10) was not cancelled (returned after %.1fs)", elapsed));
        check("57014".equals(err.getSQLState()), "expected 57014, got " + describe(err));
        check(!String.valueOf(err.getMessage()).contains("timeout"), "57014 but not from the cancel: " + err.getMessage());
        check(elapsed >= delayMs / 1000.0 - 0.05,
            String.format("cancelled after %.2fs, before this client's cancel at %.1fs", elapsed, delayMs / 1000.0));
        check(elapsed <= delayMs / 1000.0 + 5, String.format("cancelled only after %.1fs", elapsed));
        String one = queryString(conn, "SELECT 1");
        check(one.equals("1"), "SELECT 1 after the cancel returned " + one);
        String api = prepared ? "PreparedStatement.cancel()" : "Statement.cancel()";
        return String.format("%s -> 57014 after %.2fs, SELECT 1 ok after", api, elapsed);
    }

    static String doErrorInTransaction(Connection conn, String tenant) throws Exception {
        conn.setAutoCommit(false); // pgJDBC sends BEGIN with the first statement
        try {
            expectError(conn, "SELECT 1/0", "22012", "SELECT 1/0");
            expectError(conn, "SELECT 1", "25P02", "statement after the error");
            try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM customers WHERE customer_id <= ?")) {
                ps.setInt(1, 9);
                ps.executeQuery().close();
                throw new Check("prepared statement after the error did not fail");
            } catch (SQLException e) {
                check("25P02".equals(e.getSQLState()), "prepared statement after the error: expected 25P02, got " + describe(e));
            }
        } finally {
            conn.rollback();
            conn.setAutoCommit(true);
        }
        String problem = checkTenant(conn, tenant, "after ROLLBACK");
        check(problem == null, problem);
        try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM customers WHERE customer_id <= ?")) {
            ps.setInt(1, 9);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                check(rs.getInt(1) == expectedCustomers(tenant), "prepared count after ROLLBACK is " + rs.getInt(1));
            }
        }
        return "22012, then 25P02 (plain and prepared), rollback(), tenant view intact";
    }

    // pgJDBC sends a batch as one pipeline: Parse/Bind/Execute per row, one Sync at the end.
    static String doPipeline(Connection conn, String tenant, int i) throws Exception {
        String other = tenant.equals("north") ? "south" : "north";
        int base = expectedCustomers(tenant);
        String ins = "INSERT INTO customers (store_id, name, email) VALUES (?, ?, ?)";
        conn.setAutoCommit(false);
        try {
            try (PreparedStatement ps = conn.prepareStatement(ins)) {
                for (int k = 0; k < 5; k++) {
                    ps.setString(1, tenant);
                    ps.setString(2, "Pipeline " + k);
                    ps.setString(3, "jdbc-" + i + "-" + k + "@" + tenant + ".example");
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                check(counts.length == 5, "executeBatch returned " + counts.length + " update counts, expected 5");
                for (int c : counts) check(c == 1 || c == Statement.SUCCESS_NO_INFO, "an insert of the batch reported " + c + " rows");
            }
            String n = queryString(conn, "SELECT count(*) FROM customers");
            check(n.equals(String.valueOf(base + 5)), "after a batch of 5 inserts the tenant sees " + n + " customers, expected " + (base + 5));
            conn.rollback();
            // A batch with a row for the other tenant fails (RLS WITH CHECK).
            try (PreparedStatement ps = conn.prepareStatement(ins)) {
                String[] stores = {tenant, tenant, other};
                for (int k = 0; k < stores.length; k++) {
                    ps.setString(1, stores[k]);
                    ps.setString(2, "Batch " + k);
                    ps.setString(3, "jdbc-" + i + "-b" + k + "@" + stores[k] + ".example");
                    ps.addBatch();
                }
                ps.executeBatch();
                throw new Check("a batch with a row for the other tenant was accepted");
            } catch (SQLException e) {
                SQLException cause = e.getNextException() != null ? e.getNextException() : e;
                check("42501".equals(cause.getSQLState()) || "42501".equals(e.getSQLState()),
                    "batch with the other tenant's row: expected 42501, got " + describe(cause));
            }
            conn.rollback();
        } finally {
            try {
                conn.rollback();
            } catch (SQLException ignored) {
                // nothing open
            }
            conn.setAutoCommit(true);
        }
        String n = queryString(conn, "SELECT count(*) FROM customers");
        check(n.equals(String.valueOf(base)), "after the rolled-back batches the tenant sees " + n + " customers, expected " + base);
        return "executeBatch of 5 inserts correct; a batch with another tenant's row refused (42501); rolled back";
    }

    static String doTempTable(int n, String tenant) throws Exception {
        try (Connection conn = connect(tenant); Statement st = conn.createStatement()) {
            st.execute("CREATE TEMP TABLE scratch_" + n + " (x int)");
            st.execute("INSERT INTO scratch_" + n + " VALUES (1), (2), (3)");
            conn.setAutoCommit(false);
            try (ResultSet rs = st.executeQuery("SELECT count(*), sum(x) FROM scratch_" + n)) {
                rs.next();
                check(rs.getInt(1) == 3 && rs.getInt(2) == 6,
                    "read back (" + rs.getInt(1) + ", " + rs.getInt(2) + "), expected (3, 6)");
            } finally {
                conn.commit();
                conn.setAutoCommit(true);
            }
            try (PreparedStatement ps = conn.prepareStatement("INSERT INTO scratch_" + n + " VALUES (?)")) {
                ps.setInt(1, 4);
                ps.executeUpdate();
            }
            String sum = queryString(conn, "SELECT sum(x) FROM scratch_" + n);
            check(sum.equals("10"), "after a second insert sum is " + sum + ", expected 10");
            String problem = checkTenant(conn, tenant, "on the temp-table connection");
            check(problem == null, problem);
            st.execute("DROP TABLE scratch_" + n);
            return "scratch_" + n + ": created, filled and read back in later transactions (" + tenant + ")";
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Driver
    // ---------------------------------------------------------------------------------------------

    static void runClient(int i) {
        String tenant = i % 2 == 0 ? "north" : "south";
        String who = "client " + i + " (" + tenant + ")";
        Counter counter = new Counter();
        Connection conn;
        try {
            conn = connect(tenant);
        } catch (Throwable t) {
            for (String f : new String[] {"prepared", "session_settings", "error_in_transaction", "isolation", "pipeline"}) {
                record(f, who, false, "connect: " + describe(t));
            }
            if (i < CANCEL_DELAYS_MS.length) record("cancel", who, false, "connect: " + describe(t));
            return;
        }
        try {
            conn = isolation(conn, tenant, "after connect", counter);
            if (i < CANCEL_DELAYS_MS.length) {
                final Connection c = conn;
                final long delay = CANCEL_DELAYS_MS[i];
                final boolean prepared = i == 1;
                feature("cancel", who, () -> doCancel(c, delay, prepared));
                conn = isolation(conn, tenant, "after cancel", counter);
            }
            final Connection c1 = conn;
            feature("prepared", who, () -> doPrepared(c1, tenant));
            conn = isolation(conn, tenant, "after prepared", counter);
            final Connection c2 = conn;
            feature("error_in_transaction", who, () -> doErrorInTransaction(c2, tenant));
            conn = isolation(conn, tenant, "after error_in_transaction", counter);
            final Connection c3 = conn;
            feature("pipeline", who, () -> doPipeline(c3, tenant, i));
            conn = isolation(conn, tenant, "after pipeline", counter);
            final Connection c4 = conn;
            feature("session_settings", who, () -> doSessionSettings(c4, tenant));
            conn = isolation(conn, tenant, "at the end", counter);
        } finally {
            if (!counter.problems.isEmpty()) {
                record("isolation", who, false, counter.problems.size() + "/" + counter.checks
                    + " checks wrong, first: " + counter.problems.get(0));
            } else {
                record("isolation", who, true, counter.checks + " checks");
            }
            if (!counter.reconnects.isEmpty()) {
                synchronized (JdbcCheck.class) {
                    NOTES.add(who + " reconnected because the connection was unusable " + String.join(", ", counter.reconnects));
                }
            }
            try {
                conn.close();
            } catch (SQLException ignored) {
                // closing is best effort
            }
        }
    }

    static long remainingMs() {
        long elapsed = (System.nanoTime() - START) / 1_000_000;
        return Math.max(100, (long) (deadlineSeconds * 1000) - elapsed);
    }

    static String env(String name, String dflt) {
        String v = System.getenv(name);
        if (v == null || v.isEmpty()) v = dflt;
        if (v == null || v.isEmpty()) failEarly("environment variable " + name + " is not set");
        return v;
    }

    static void failEarly(String msg) {
        System.err.println(DRIVER + ": " + msg);
        System.exit(2);
    }

    static boolean joinAll(List<Thread> threads) throws InterruptedException {
        for (Thread t : threads) {
            t.join(remainingMs());
            if (t.isAlive()) return false;
        }
        return true;
    }

    public static void main(String[] args) throws Exception {
        host = env("PGHOST", "127.0.0.1");
        port = Integer.parseInt(env("PGPORT", null));
        database = env("PGDATABASE", null);
        user = env("PGUSER", "app");
        sslmode = env("PGSSLMODE", "disable");
        TOKENS.put("north", env("TOKEN_NORTH", null));
        TOKENS.put("south", env("TOKEN_SOUTH", null));
        USERS.put("north", env("COMPAT_USER_NORTH", user));
        USERS.put("south", env("COMPAT_USER_SOUTH", user));
        clients = Integer.parseInt(env("COMPAT_CLIENTS", "10"));
        deadlineSeconds = Double.parseDouble(env("COMPAT_DEADLINE", "50"));
        for (String f : FEATURES) RESULTS.put(f, new ArrayList<>());

        try {
            Class.forName("org.postgresql.Driver");
        } catch (ClassNotFoundException e) {
            failEarly("pgJDBC is not on the classpath (java -cp /usr/share/java/postgresql.jar ...)");
        }
        try (Connection probe = connect("north")) {
            queryString(probe, "SELECT 1");
        } catch (SQLException e) {
            failEarly("cannot connect to " + host + ":" + port + "/" + database + ": " + describe(e));
        }

        List<Thread> threads = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            final int n = i;
            Thread t = new Thread(() -> runClient(n), "client-" + i);
            t.setDaemon(true);
            threads.add(t);
            t.start();
        }
        boolean finished = joinAll(threads);
        if (finished) {
            // After the concurrent phase, so a connection pinned by a temporary table cannot starve it.
            Thread temp = new Thread(() -> feature("temp_table", "temp client (north)", () -> doTempTable(clients, "north")));
            temp.setDaemon(true);
            temp.start();
            finished = joinAll(List.of(temp));
        }

        Map<String, Integer> expected = new LinkedHashMap<>();
        for (String f : FEATURES) expected.put(f, clients);
        expected.put("cancel", Math.min(clients, CANCEL_DELAYS_MS.length));
        expected.put("temp_table", 1);
        for (String f : FEATURES) {
            String[] s = summary(f, expected.get(f));
            System.out.println("{\"driver\": " + json(DRIVER) + ", \"feature\": " + json(f) + ", \"ok\": " + s[0]
                + ", \"detail\": " + json(s[1]) + "}");
        }
        System.out.flush();
        if (!finished) {
            System.err.println(DRIVER + ": deadline of " + secs(deadlineSeconds) + "s reached, unfinished work abandoned");
        }
        System.exit(0);
    }
}
