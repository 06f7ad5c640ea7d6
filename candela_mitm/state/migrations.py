"""The SQLite state store's schema as named steps, applied in order and recorded (sqlite-utils).

Adding a table or a column is appending one entry to STEPS: a new name and what it does. The
step runs once per database, and its name is recorded in `_sqlite_migrations` (sqlite-utils'
table, migration set "candela_state") with the time it was applied. Names are never renamed
or reordered once released: a database knows its steps by name.

The first seven steps are the schema versions 1-7 that `PRAGMA user_version` counted before the
steps had names (008 and 009 were numbered 7 and 8 on development builds: they create only what is
missing too). Each of them creates only what is missing, so a database any of those versions
left behind (or a partial one) is brought up to date by running them all. `PRAGMA user_version`
keeps counting the steps: a Candela from before named steps refuses a database with more steps
than it knows, as this one refuses a database that applied a step it does not know.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from candela_mitm.errors import StoreUnavailable

Step = Callable[[Database], None]


def _sql(*statements: str) -> Step:
    def run(db: Database) -> None:
        for statement in statements:
            db.execute(statement)

    return run


def _columns(table: str, *columns: tuple[str, str]) -> Step:
    """Add the columns `table` lacks (a database made before named steps may have them)."""

    def run(db: Database) -> None:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})").fetchall()}
        for name, kind in columns:
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    return run


def _all(*steps: Step) -> Step:
    def run(db: Database) -> None:
        for step in steps:
            step(db)

    return run


def _rate_count(db: Database) -> None:
    """rate_count: a running count per rate_log key, so a rate check no longer counts the whole
    window's log. A log written before it is counted once, when the table is made."""
    made = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rate_count'")
    if made.fetchone() is not None:
        return
    db.execute("CREATE TABLE rate_count (key TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID")
    db.execute("INSERT INTO rate_count (key, n) SELECT key, count(*) FROM rate_log GROUP BY key")


STEPS: Sequence[tuple[str, Step]] = [
    (
        "001_users_ledger_rates",
        _sql(
            """CREATE TABLE IF NOT EXISTS users (
                user_id TEXT PRIMARY KEY,
                record TEXT NOT NULL,
                deleted INTEGER NOT NULL DEFAULT 0
            )""",
            # One row per user and budget period: every spend, the part drawn from grants, and
            # the allowance held by active reservations; running totals, so a reserve reads one
            # row.
            """CREATE TABLE IF NOT EXISTS days (
                user_id TEXT NOT NULL,
                day TEXT NOT NULL,
                spent INTEGER NOT NULL DEFAULT 0,
                from_grants INTEGER NOT NULL DEFAULT 0,
                reserved INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (user_id, day)
            ) WITHOUT ROWID""",
            """CREATE TABLE IF NOT EXISTS grants (
                grant_id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                amount INTEGER NOT NULL,
                used INTEGER NOT NULL DEFAULT 0,
                held INTEGER NOT NULL DEFAULT 0,
                expires_us INTEGER NOT NULL,
                reason TEXT NOT NULL,
                actor TEXT NOT NULL,
                created_us INTEGER NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS grants_by_user ON grants (user_id, expires_us, grant_id)",
            """CREATE TABLE IF NOT EXISTS reservations (
                reservation_id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                tenant TEXT NOT NULL,
                day TEXT NOT NULL,
                amount INTEGER NOT NULL,
                budget INTEGER NOT NULL,
                daily_hold INTEGER NOT NULL,
                grant_holds TEXT NOT NULL,
                request_id TEXT NOT NULL,
                owner TEXT NOT NULL,
                created_us INTEGER NOT NULL,
                status TEXT NOT NULL,
                cost INTEGER,
                finished_us INTEGER
            )""",
            """CREATE INDEX IF NOT EXISTS reservations_active ON reservations (created_us)
                WHERE status = 'active'""",
            """CREATE INDEX IF NOT EXISTS reservations_finished ON reservations (finished_us)
                WHERE status != 'active'""",
            """CREATE TABLE IF NOT EXISTS spend (
                day TEXT NOT NULL,
                user_id TEXT NOT NULL,
                tenant TEXT NOT NULL,
                model TEXT NOT NULL,
                provider TEXT NOT NULL,
                cost INTEGER NOT NULL,
                tokens_in INTEGER NOT NULL,
                tokens_out INTEGER NOT NULL,
                requests INTEGER NOT NULL,
                PRIMARY KEY (day, user_id, tenant, model, provider)
            ) WITHOUT ROWID""",
            "CREATE TABLE IF NOT EXISTS rate_log (key TEXT NOT NULL, ts INTEGER NOT NULL)",
            "CREATE INDEX IF NOT EXISTS rate_log_by_key ON rate_log (key, ts)",
        ),
    ),
    ("002_rate_count", _rate_count),
    # a reservation settled at the next start, after its process died, is recorded under these
    (
        "003_reservations_name_their_model",
        _columns(
            "reservations",
            ("model", "TEXT NOT NULL DEFAULT ''"),
            ("provider", "TEXT NOT NULL DEFAULT ''"),
        ),
    ),
    (
        "004_budget_periods_and_tenants",
        _all(
            _columns(
                "reservations",
                ("period", "TEXT NOT NULL DEFAULT ''"),
                ("tenant_period", "TEXT NOT NULL DEFAULT ''"),
                ("tenant_hold", "INTEGER NOT NULL DEFAULT 0"),
            ),
            _sql(
                """CREATE TABLE IF NOT EXISTS tenants (
                    tenant_id TEXT PRIMARY KEY,
                    record TEXT NOT NULL
                )""",
                # one row per tenant and budget period (as `days` for users)
                """CREATE TABLE IF NOT EXISTS tenant_periods (
                    tenant TEXT NOT NULL,
                    period TEXT NOT NULL,
                    spent INTEGER NOT NULL DEFAULT 0,
                    reserved INTEGER NOT NULL DEFAULT 0,
                    PRIMARY KEY (tenant, period)
                ) WITHOUT ROWID""",
            ),
        ),
    ),
    (
        "005_token_windows_and_leases",
        _sql(
            # one row per admitted request and key, corrected at settlement
            """CREATE TABLE IF NOT EXISTS token_log (
                key TEXT NOT NULL,
                entry_id TEXT NOT NULL,
                ts INTEGER NOT NULL,
                amount INTEGER NOT NULL,
                PRIMARY KEY (key, entry_id)
            ) WITHOUT ROWID""",
            "CREATE INDEX IF NOT EXISTS token_log_by_time ON token_log (key, ts)",
            """CREATE TABLE IF NOT EXISTS leases (
                key TEXT NOT NULL,
                lease_id TEXT NOT NULL,
                owner TEXT NOT NULL,
                expires_us INTEGER NOT NULL,
                PRIMARY KEY (key, lease_id)
            ) WITHOUT ROWID""",
        ),
    ),
    (
        "006_api_keys",
        _sql(
            """CREATE TABLE IF NOT EXISTS api_keys (
                key_id TEXT PRIMARY KEY,
                sha256 TEXT NOT NULL UNIQUE,
                user_id TEXT NOT NULL,
                record TEXT NOT NULL
            )""",
        ),
    ),
    (
        "007_budget_alerts",
        _sql(
            # one row per threshold alert claimed: its primary key is every process's dedupe
            """CREATE TABLE IF NOT EXISTS budget_alerts (
                scope TEXT NOT NULL,
                scope_id TEXT NOT NULL,
                period TEXT NOT NULL,
                threshold INTEGER NOT NULL,
                claimed_us INTEGER NOT NULL,
                expires_us INTEGER NOT NULL,
                PRIMARY KEY (scope, scope_id, period, threshold)
            ) WITHOUT ROWID""",
        ),
    ),
    (
        "008_async_jobs",
        _sql(
            # asynchronous jobs created through Candela: their owner and creation charge, until
            # a true-up
            """CREATE TABLE IF NOT EXISTS jobs (
                provider TEXT NOT NULL,
                job_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                tenant TEXT NOT NULL,
                model TEXT NOT NULL,
                reservation_id TEXT NOT NULL,
                charged INTEGER NOT NULL,
                tokens_in INTEGER NOT NULL,
                tokens_out INTEGER NOT NULL,
                created_us INTEGER NOT NULL,
                day TEXT NOT NULL,
                period TEXT NOT NULL,
                tenant_period TEXT NOT NULL,
                cost INTEGER,
                trued_up_us INTEGER,
                request_id TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (provider, job_id)
            ) WITHOUT ROWID""",
            # the objects jobs are made from or make (a batch's input and output files), by key
            """CREATE TABLE IF NOT EXISTS job_objects (
                provider TEXT NOT NULL,
                key TEXT NOT NULL,
                record TEXT NOT NULL,
                PRIMARY KEY (provider, key)
            ) WITHOUT ROWID""",
        ),
    ),
    (
        "009_api_key_budgets",
        _all(
            # one row per API key budget (a key's lineage) and period: spend and active holds
            _sql(
                """CREATE TABLE IF NOT EXISTS key_periods (
                    key_id TEXT NOT NULL,
                    period TEXT NOT NULL,
                    spent INTEGER NOT NULL DEFAULT 0,
                    reserved INTEGER NOT NULL DEFAULT 0,
                    PRIMARY KEY (key_id, period)
                ) WITHOUT ROWID""",
            ),
            # reservations name their key row
            _columns(
                "reservations",
                ("key_id", "TEXT NOT NULL DEFAULT ''"),
                ("key_period", "TEXT NOT NULL DEFAULT ''"),
                ("key_hold", "INTEGER NOT NULL DEFAULT 0"),
            ),
        ),
    ),
    (
        # a budget slice (governance/slices.py) counts the spend and requests recorded on it
        # while it stays held (settle_part): a restart after its process died settles from
        # the audit entries past them
        "010_slices_count_their_parts",
        _columns(
            "reservations",
            ("settled", "INTEGER NOT NULL DEFAULT 0"),
            ("parts", "INTEGER NOT NULL DEFAULT 0"),
        ),
    ),
    (
        # one row: the count of changes to users, tenants, grants and API keys, which every
        # proxy process polls to know when to forget the settings it remembers
        # (GenerationStore; governance.settings_watch)
        "011_settings_generation",
        _sql(
            """CREATE TABLE IF NOT EXISTS settings_generation (
                id INTEGER PRIMARY KEY CHECK (id = 0),
                n INTEGER NOT NULL
            )""",
            "INSERT OR IGNORE INTO settings_generation (id, n) VALUES (0, 0)",
        ),
    ),
    (
        # marks a refused reservation leaves for the processes holding budget slices of its
        # budget, read at their flush (SliceRecallStore; governance/slices.py): the newest kept
        "012_slice_recalls",
        _sql(
            """CREATE TABLE IF NOT EXISTS slice_recalls (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                scope TEXT NOT NULL,
                name TEXT NOT NULL,
                at_us INTEGER NOT NULL
            )""",
        ),
    ),
]

SCHEMA_VERSION = len(STEPS)  # what PRAGMA user_version holds once every step has run


def _migrations(steps: Sequence[tuple[str, Step]]) -> Migrations:
    migrations = Migrations("candela_state")
    for name, step in steps:
        migrations(name=name)(step)
    return migrations


MIGRATIONS = _migrations(STEPS)


def migrate(conn: sqlite3.Connection, where: str) -> None:
    """Apply the steps this database has not run, inside the caller's write transaction.

    The caller holds the write lock (BEGIN IMMEDIATE): processes opening the store at once run
    each step once, and the steps commit together with their records, or none of them does.
    sqlite-utils runs each step and its record in a savepoint of that transaction.
    Raises StoreUnavailable for a database a newer Candela made (`where` names it).
    """
    db = Database(conn, recursive_triggers=False, execute_plugins=False)
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"{where} has schema {version}, newer than this Candela ({SCHEMA_VERSION})"
        )
    known = {name for name, _ in STEPS}
    unknown = [m.name for m in MIGRATIONS.applied(db) if m.name not in known]
    if unknown:
        raise StoreUnavailable(
            f"{where} has schema steps this Candela does not know ({', '.join(unknown)}): "
            "a newer Candela made it"
        )
    MIGRATIONS.apply(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
