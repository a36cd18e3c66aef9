// pgjdbc through Sluice: PreparedStatements reused past prepareThreshold, in many threads.
//
// Run: java -cp /usr/share/java/postgresql.jar tests/drivers/JdbcCheck.java
// Reads SLUICE_HOST, SLUICE_PORT, SLUICE_USER, SLUICE_PASSWORD, SLUICE_DB (and optionally
// SLUICE_CLIENTS, default 50, SLUICE_ITERATIONS, default 20). Expects sluice_fixture(id, label)
// with ids 1..1000 in SLUICE_DB.
//
// pgjdbc switches a PreparedStatement to a named server statement (S_N) after prepareThreshold
// (default 5) executions; from then on it only binds and executes it, on whatever server
// connection the pooler picks. Exits 1 with the first mismatches on any failure.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

public class JdbcCheck {
    static String env(String k, String d) {
        String v = System.getenv(k);
        if (v == null && d == null) throw new IllegalStateException("missing " + k);
        return v == null ? d : v;
    }

    static void check(String what, Object got, Object want) {
        if (!want.equals(got)) throw new AssertionError(what + ": got " + got + ", want " + want);
    }

    static void client(String url, Properties props, int n, int iterations) throws Exception {
        try (Connection c = DriverManager.getConnection(url, props)) {
            c.setAutoCommit(true);
            try (PreparedStatement dbl = c.prepareStatement("select ?::int * 2, ?::text");
                 PreparedStatement fix = c.prepareStatement("select label from sluice_fixture where id = ?")) {
                for (int i = 0; i < iterations; i++) {
                    int a = n * 1000 + i, fid = (n * 37 + i) % 1000 + 1;
                    String s = "c" + n + "-i" + i;
                    dbl.setInt(1, a);
                    dbl.setString(2, s);
                    try (ResultSet rs = dbl.executeQuery()) {
                        check("double row", rs.next(), true);
                        check("double", rs.getInt(1), 2 * a);
                        check("text", rs.getString(2), s);
                        check("double rows", rs.next(), false);
                    }
                    fix.setInt(1, fid);
                    try (ResultSet rs = fix.executeQuery()) {
                        check("fixture row", rs.next(), true);
                        check("fixture", rs.getString(1), "item-" + fid);
                    }
                }
            }
        }
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + env("SLUICE_HOST", null) + ":" + env("SLUICE_PORT", null)
            + "/" + env("SLUICE_DB", null);
        Properties props = new Properties();
        props.setProperty("user", env("SLUICE_USER", null));
        String pw = env("SLUICE_PASSWORD", "");
        if (!pw.isEmpty()) props.setProperty("password", pw);
        props.setProperty("ApplicationName", "JdbcCheck");
        props.setProperty("connectTimeout", "30");
        props.setProperty("sslmode", "disable");
        int clients = Integer.parseInt(env("SLUICE_CLIENTS", "50"));
        int iterations = Integer.parseInt(env("SLUICE_ITERATIONS", "20"));

        List<String> errors = Collections.synchronizedList(new ArrayList<>());
        ExecutorService pool = Executors.newFixedThreadPool(clients);
        for (int n = 0; n < clients; n++) {
            final int id = n;
            pool.submit(() -> {
                try {
                    client(url, props, id, iterations);
                } catch (Throwable e) {
                    errors.add("client " + id + ": " + e);
                }
            });
        }
        pool.shutdown();
        if (!pool.awaitTermination(240, TimeUnit.SECONDS)) errors.add("clients did not finish within 240 s");
        String version = org.postgresql.Driver.class.getPackage().getImplementationVersion();
        if (!errors.isEmpty()) {
            System.err.println("pgjdbc " + version + ": " + errors.size() + " of " + clients + " clients failed");
            errors.stream().limit(5).forEach(System.err::println);
            System.exit(1);
        }
        System.out.println("pgjdbc " + version + ": ok, " + clients + " clients x " + iterations + " iterations");
        System.exit(0);
    }
}
