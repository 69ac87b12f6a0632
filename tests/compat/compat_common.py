"""Shared harness of the Python driver checks (psycopg_check.py, asyncpg_check.py): the
features, the tenants' expected data, settings from the environment, and result collection."""

import os
import sys
import threading
import time

FEATURES = [
    "prepared",
    "session_settings",
    "cancel",
    "temp_table",
    "error_in_transaction",
    "isolation",
    "pipeline",
]
EXPECTED_CUSTOMERS = {"north": 3, "south": 2}
CUSTOMER_IDS = {"north": {1, 2, 3}, "south": {4, 5}}
PREPARED_RUNS = 25
CANCEL_DELAYS = [0.5, 1.0]  # clients 0 (north) and 1 (south) cancel after these delays


def fail_early(msg):
    print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr)
    sys.exit(2)


def env(name, default=None):
    value = os.environ.get(name, default)
    if value is None or value == "":
        fail_early(f"environment variable {name} is not set")
    return value


PGHOST = env("PGHOST", "127.0.0.1")
PGPORT = int(env("PGPORT"))
PGDATABASE = env("PGDATABASE")
PGUSER = env("PGUSER", "app")
PGSSLMODE = env("PGSSLMODE", "disable")
TOKENS = {"north": env("TOKEN_NORTH"), "south": env("TOKEN_SOUTH")}
USERS = {
    "north": os.environ.get("COMPAT_USER_NORTH") or PGUSER,
    "south": os.environ.get("COMPAT_USER_SOUTH") or PGUSER,
}
CLIENTS = int(os.environ.get("COMPAT_CLIENTS") or "10")
DEADLINE = float(os.environ.get("COMPAT_DEADLINE") or "50")
START = time.monotonic()


class Results:
    """Per-feature outcomes collected from every connection (thread-safe)."""

    def __init__(self, features=FEATURES):
        self.lock = threading.Lock()
        self.items = {f: [] for f in features}
        self.notes = []

    def add(self, feature, who, ok, detail):
        with self.lock:
            self.items[feature].append((who, bool(ok), str(detail)))

    def note(self, text):
        """Something the isolation line should mention (a connection replaced after a failure)."""
        with self.lock:
            self.notes.append(text)

    def summary(self, feature, expected):
        with self.lock:
            items = list(self.items[feature])
        failed = [i for i in items if not i[1]]
        if failed:
            text = "; ".join(f"{who}: {detail}" for who, _, detail in failed[:3])
            more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
            return False, f"{len(failed)}/{len(items)} failed: {text}{more}"[:600]
        if len(items) < expected:
            return False, f"only {len(items)} of {expected} connections finished this before the deadline of {DEADLINE:g}s"
        if feature == "isolation":
            total = sum(int(d.split()[0]) for _, _, d in items)
            notes = f"; {'; '.join(self.notes[:3])}" if self.notes else ""
            return True, (f"{len(items)} connections, {total} tenant checks: each saw only its own "
                          f"tenant (north 3 customers, south 2){notes}")[:600]
        details = sorted({d for _, _, d in items})
        text = details[0] if len(details) == 1 else "; ".join(details[:3])
        return True, f"{len(items)}/{len(items)} ok: {text}"[:600]
