"""`strata audit verify|trace|prune|erase` and `strata cost` through the real CLI (typer's
CliRunner, settings from the environment), on SQLite and on Postgres when configured.

The tests are synchronous: the CLI runs its own event loop (``asyncio.run``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from stratamesh.audit.schema import RECORDS_TABLE
from stratamesh.audit.store import AuditStore
from stratamesh.cli import app
from stratamesh.config import Settings
from stratamesh.security.keys import load_signing_key
from stratamesh.stores.redis import open_redis
from tests.integration.test_audit_store import BACKENDS, backend_settings, drop_backend, entries

CHAIN = "inference.completed/0"


@pytest.fixture(params=BACKENDS)
async def filled(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Settings]:
    """A trail of 12 billed calls (req-0 … req-3) and a RequestCompleted of req-1."""
    settings = backend_settings(Settings(home=tmp_path / "home"), request.param)
    from stratamesh.security.keys import generate_identity

    generate_identity(settings.keys_dir, "audit")
    store = await AuditStore.open(settings, signer=load_signing_key(settings, "audit"))
    await store.append(CHAIN, entries(12))
    done = entries(1, start=50, topic="results", event_type="RequestCompleted", billed=0)
    done[0].request_id, done[0].detail = "req-1", '{"status":"ok","scores":{"judge":0.9}}'
    await store.append("results/0", done)
    await store.close()
    yield settings
    await drop_backend(settings)


def cli(settings: Settings, *args: str) -> tuple[int, str]:
    env = {
        "STRATA_HOME": str(settings.home),
        "STRATA_DATABASE_URL": settings.database_url or "",
        "STRATA_AUDIT__DB_SCHEMA": settings.audit.db_schema or "",
        "STRATA_REDIS_URL": settings.redis_url or "",
        "COLUMNS": "200",
    }
    if not settings.audit.db_schema:
        del env["STRATA_AUDIT__DB_SCHEMA"]
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.output


async def tamper(settings: Settings, text: str) -> None:
    store = await AuditStore.open(settings)
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(text))
    await store.close()


def test_verify_reports_an_intact_trail_then_names_the_altered_record(
    filled: Settings,
) -> None:
    code, out = cli(filled, "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["records"] == 13 and report["chains"] == 2
    asyncio.run(tamper(filled, f"UPDATE {RECORDS_TABLE} SET output_tokens = 1 WHERE seq = 4"))
    asyncio.run(tamper(filled, f"DELETE FROM {RECORDS_TABLE} WHERE chain = '{CHAIN}' AND seq = 9"))
    code, out = cli(filled, "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert [(f["kind"], f["chain"], f["seq"]) for f in report["findings"]] == [
        ("altered", CHAIN, 4),
        ("removed", CHAIN, 9),
    ]
    code, out = cli(filled, "audit", "verify", "--chain", CHAIN, "--from-seq", "1", "--to-seq", "3")
    assert code == 0
    code, out = cli(filled, "audit", "verify")  # the table form names the kind and record
    assert code == 1 and "altered" in out and "removed" in out and "seq 4" in out


def test_trace_shows_every_stage_of_a_request(filled: Settings) -> None:
    code, out = cli(filled, "audit", "trace", "req-1", "--json")
    assert code == 0
    steps = json.loads(out)["steps"]
    assert [s["event_type"] for s in steps] == [*["CandidateAnswer"] * 3, "RequestCompleted"]
    assert [s["since_start_ms"] for s in steps] == [0, 1, 2, 47]
    assert steps[-1]["summary"] == "status=ok judge=0.90"
    code, out = cli(filled, "audit", "trace", "req-1")
    assert code == 0 and "RequestCompleted" in out and "qwen@r2" in out
    code, out = cli(filled, "audit", "trace", "no-such-request")
    assert code == 2 and "no audit records" in out


def test_cost_by_tenant_model_and_request(filled: Settings) -> None:
    code, out = cli(filled, "cost", "--tenant", "acme", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["total"]["calls"] == 6 and report["total"]["cost_usd"] == pytest.approx(1.5)
    assert {line["model"] for line in report["lines"]} == {"smollm2@r1"}
    code, out = cli(filled, "cost", "--by", "request", "--json")
    lines = {x["request"]: x["calls"] for x in json.loads(out)["lines"]}
    assert lines == {"req-0": 3, "req-1": 3, "req-2": 3, "req-3": 3}
    code, out = cli(filled, "cost", "--since", "2023-11-14T22:13:20.006", "--json")
    assert json.loads(out)["total"]["calls"] == 6  # entries 6..11 (occurred_ms ≥ …006)
    code, out = cli(filled, "cost", "--model", "qwen@r2")
    assert code == 0 and "globex" in out and "total" in out
    code, out = cli(filled, "cost", "--by", "planet")
    assert code == 2 and "use tenant, model, request" in out


def test_prune_is_a_dry_run_until_told(filled: Settings) -> None:
    code, out = cli(filled, "audit", "prune")
    assert code == 2 and "RETENTION_DAYS" in out
    code, out = cli(filled, "audit", "prune", "--older-than-days", "1")
    assert code == 0 and "13 record(s)" in out and "--yes" in out
    code, out = cli(filled, "audit", "prune", "--older-than-days", "1", "--yes")
    assert code == 0 and "pruned 13 record(s) in 2 chain(s)" in out
    code, out = cli(filled, "audit", "verify", "--json")
    assert code == 0 and json.loads(out)["records"] == 0


def test_erase_removes_the_mappings_and_the_trail_still_verifies(
    filled: Settings,
) -> None:
    from stratamesh.audit.erasure import pseudonyms_of
    from stratamesh.security.pseudonym import RedisMappingStore

    secret = b"s" * 32
    (filled.keys_dir / "guard.secret").write_text(secret.decode() + "\n")
    jane, other = pseudonyms_of(secret, "acme", [("PERSON", "Jane  DOE"), ("PERSON", "Bob")])

    async def put() -> None:
        redis = open_redis(filled)
        await RedisMappingStore(redis).put("acme", {jane: "Jane Doe", other: "Bob"}, 60)
        await redis.aclose()

    async def get() -> list[str | None]:
        redis = open_redis(filled)
        try:
            return await RedisMappingStore(redis).get("acme", [jane, other])
        finally:
            await redis.aclose()

    asyncio.run(put())
    code, out = cli(
        filled, "audit", "erase", "--tenant", "acme", "--value", "PERSON=jane doe", "--json"
    )
    assert code == 0, out
    assert json.loads(out)["mappings_removed"] == 1
    assert asyncio.run(get()) == [None, "Bob"]
    code, out = cli(filled, "audit", "verify", "--json")
    assert code == 0 and json.loads(out)["chains"] == 3  # + audit.erasures/0
    code, out = cli(filled, "audit", "erase", "--tenant", "acme", "--value", "nokind")
    assert code == 2
