"""The web dashboard over HTTP: every page and action, on the real store and broker (both stores).

What an operator would check: the status codes, the data on each page, that a
value holding markup shows as text, and that the guard holds (the token,
read-only mode, a cross-site or token-less POST refused).
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from stepline import Client, Producer, Schedule
from stepline.producer.dashboard import pages
from stepline.shared.db.schema import instances
from stepline.shared.process import this_process
from stepline.shared.settings import DatabaseSettings, Settings
from stepline.shared.topology import routing_key
from tests.support import db
from tests.support.amqp import dead_letter_count, publish_raw
from tests.support.dashboard import BASE_URL, csrf_of, dashboard, post_action, with_ui
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status
from tests.support.stranding import age, lost_step

pytestmark = pytest.mark.both_backends

SEQUENCE = {"a": 2, "b": 3}


async def _finished(producer: Producer, control: Client, workflow: str, params: object) -> str:
    instance_id = await producer.start(workflow, params)
    await control.wait(instance_id, timeout=30)
    return instance_id


async def _waiting_approval(producer: Producer, control: Client) -> str:
    instance_id = await producer.start("approval", {"timeout": "1 day"})
    await until_status(control, instance_id, "waiting")
    return instance_id


def _text(page: str) -> str:
    """A page's visible text, tags stripped and entities read, spaces collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


async def test_overview_shows_each_workflow_by_status_the_load_and_the_backlogs(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    await _finished(producer, control, "sequence", SEQUENCE)
    await _finished(producer, control, "sequence", SEQUENCE)
    await _waiting_approval(producer, control)

    async with dashboard(settings) as http:
        response = await http.get("/")
    assert response.status_code == 200
    text = _text(response.text)
    sequence_row = re.search(
        r"<tr>\s*<td><a href=\"/instances\?workflow=sequence\">.*?</tr>", response.text, re.S
    )
    assert sequence_row, response.text
    assert 'href="/instances?workflow=sequence&amp;status=complete">2</a>' in sequence_row.group(0)
    assert 'href="/instances?workflow=approval&amp;status=waiting">1</a>' in response.text
    assert "Steps / s (last 5 min)" in text and "Outbox backlog" in text and "Dead letters" in text
    # Two sequences ran 3 attempts each, approval 1: the hour's chart counts them.
    assert "7 attempts in the last hour" in text
    assert "finished ones are counted up to 1,000 per workflow" in text
    assert "No held instance, and" in text


async def test_overview_calls_out_held_and_stranded_instances(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    stranded = await lost_step(producer, control, settings)
    await age(settings.database, stranded, timedelta(hours=1))
    held = await _waiting_approval(producer, control)
    await db.execute(
        settings.database,
        instances.update()
        .where(instances.c.id == held)
        .values(
            status="paused", error={"type": "NonDeterminismError", "message": "replay diverged at `act`"}
        ),
    )
    async with dashboard(settings) as http:
        text = _text((await http.get("/")).text)
    assert "Needs attention" in text
    assert f"{held} approval — NonDeterminismError: replay diverged at `act`" in text
    assert f"{stranded} slow-pair — stranded: nothing will move it" in text


async def test_instances_filter_by_the_url_newest_first_with_keyset_pages(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.start_worker()
    done = [await _finished(producer, control, "sequence", SEQUENCE) for _ in range(3)]
    waiting = await _waiting_approval(producer, control)
    monkeypatch.setattr(pages, "PAGE_SIZE", 2)

    async with dashboard(settings) as http:
        every = await http.get("/instances")
        first = await http.get("/instances", params={"workflow": "sequence", "status": "complete"})
        older = re.search(r'id="older" href="([^"]+)"', first.text)
        assert older, "a second page is offered"
        second = await http.get(html.unescape(older.group(1)))
        by_prefix = await http.get("/instances", params={"id": waiting[:8]})
        by_build = await http.get("/instances", params={"build": "no-such-build"})
        bad = await http.get("/instances", params={"status": "sleeping", "since": "yesterday"})

    assert every.status_code == 200
    assert re.findall(r'class="mono" href="/instances/([^"]+)"', every.text) == [waiting, done[2]]
    shown = re.findall(r'class="mono" href="/instances/([^"]+)"', first.text)
    assert shown == [done[2], done[1]]
    assert re.findall(r'class="mono" href="/instances/([^"]+)"', second.text) == [done[0]]
    assert 'id="older"' not in second.text and "« Newest" in second.text
    # The filters stay in the page's links, so the address can be shared.
    assert "workflow=sequence" in older.group(1) and "status=complete" in older.group(1)
    assert '<option value="sequence" selected>' in first.text
    assert re.findall(r'class="mono" href="/instances/([^"]+)"', by_prefix.text) == [waiting]
    assert "No instance matches these filters." in by_build.text
    assert bad.status_code == 400
    text = _text(bad.text)
    assert "status 'sleeping' is not one of" in text and "'yesterday' is not a time" in text


async def test_instance_page_shows_status_params_output_timeline_and_why(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    parent = await _finished(producer, control, "parent", SEQUENCE)
    info = await control.get(parent)
    assert info is not None
    async with dashboard(settings) as http:
        response = await http.get(f"/instances/{parent}")
        [child] = [row.id for row in await control.list(workflow="sequence")]
        child_page = await http.get(f"/instances/{child}")
    assert response.status_code == 200
    text = _text(response.text)
    assert f"{parent} complete" in text
    assert f"{parent} (parent, complete): complete at" in text  # the `why` paragraph
    assert '"a": 2' in text and '"after": "P"' in text  # params and output, pretty-printed
    assert f'href="/instances/{quote(child, safe="")}"' in response.text  # the child, linked
    assert f'href="/instances/{parent}"' in child_page.text  # and the parent from the child
    # The child's timeline: a bar per attempt, each with its hover text naming the outcome and worker.
    timeline = re.search(r'<svg id="timeline".*?</svg>', child_page.text, re.S)
    assert timeline
    labels = re.findall(r'class="glabel">([^<]+)<', timeline.group(0))
    assert labels == ["add #1", "multiply #1", "describe #1"]
    assert re.search(r"<title>add #1: succeeded, \d+ ms on test-worker-1</title>", timeline.group(0))


async def test_a_value_holding_markup_shows_as_text(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    script = "<script>alert('owned')</script>"
    instance_id = await _finished(producer, control, "odd-text", script)
    async with dashboard(settings) as http:
        page = await http.get(f"/instances/{instance_id}")
        listing = await http.get("/instances")
    assert page.status_code == 200
    for body in (page.text, listing.text):
        assert "<script>alert" not in body
        assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in body
    assert (
        "Content-Security-Policy" in page.headers
        and "script-src 'self'" in page.headers["Content-Security-Policy"]
    )


async def test_a_long_value_is_folded_with_its_start_shown(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await _finished(producer, control, "huge-result", 5000)
    async with dashboard(settings) as http:
        page = await http.get(f"/instances/{instance_id}")
    assert page.status_code == 200
    assert '<details class="json">' in page.text and "characters)" in page.text


async def test_pause_resume_send_event_terminate_and_restart_from_the_page(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    approval = await _waiting_approval(producer, control)
    other = await _waiting_approval(producer, control)
    page = f"/instances/{approval}"
    async with dashboard(settings) as http:
        paused = await post_action(http, f"{page}/pause", from_page=page)
        assert (paused.status_code, paused.headers["location"]) == (303, f"{page}?done=pause")
        assert (await control.get(approval)).status == "paused"  # type: ignore[union-attr]
        shown = await http.get(paused.headers["location"])
        assert "Paused: no new step starts until it is resumed." in shown.text

        assert (await post_action(http, f"{page}/resume", from_page=page)).status_code == 303
        await until_status(control, approval, "waiting")

        sent = await post_action(
            http, f"{page}/event", {"event_type": "approved", "payload": '{"by": "ops"}'}, from_page=page
        )
        assert sent.status_code == 303
        done = await control.wait(approval, timeout=30)
        assert done.output == {"decision": {"by": "ops"}, "after": "{'BY': 'OPS'}"}

        refused = await post_action(http, f"{page}/terminate", from_page=page)
        assert refused.status_code == 409
        assert "terminate refused" in _text(refused.text)

        terminated = await post_action(http, f"/instances/{other}/terminate", from_page=f"/instances/{other}")
        assert terminated.status_code == 303
        assert (await control.get(other)).status == "terminated"  # type: ignore[union-attr]

        restarted = await post_action(http, f"{page}/restart", from_page=page)
        assert restarted.status_code == 303
        await until_status(control, approval, "waiting")


async def test_a_cross_site_or_token_less_post_is_refused(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await _waiting_approval(producer, control)
    url = f"/instances/{instance_id}/terminate"
    async with dashboard(settings) as http:
        token = csrf_of((await http.get(f"/instances/{instance_id}")).text)
        cross = await http.post(url, data={"csrf": token}, headers={"Origin": "https://evil.example"})
        fetched = await http.post(url, data={"csrf": token}, headers={"Sec-Fetch-Site": "cross-site"})
        referred = await http.post(url, data={"csrf": token}, headers={"Referer": "https://evil.example/x"})
        no_token = await http.post(url, data={}, headers={"Origin": BASE_URL})
        wrong = await http.post(url, data={"csrf": "guess"}, headers={"Origin": BASE_URL})
    assert [r.status_code for r in (cross, fetched, referred, no_token, wrong)] == [403] * 5
    assert "cross-site request refused" in cross.text and "CSRF token" in no_token.text
    assert (await control.get(instance_id)).status == "waiting"  # type: ignore[union-attr]


async def test_read_only_hides_every_action_and_refuses_action_posts(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await _waiting_approval(producer, control)
    async with dashboard(settings) as writable:
        token = csrf_of((await writable.get(f"/instances/{instance_id}")).text)
    async with dashboard(settings, read_only=True) as http:
        page = await http.get(f"/instances/{instance_id}")
        refused = await http.post(
            f"/instances/{instance_id}/terminate", data={"csrf": token}, headers={"Origin": BASE_URL}
        )
        letters = await http.get("/dead-letters")
    assert page.status_code == 200 and "read-only" in page.text
    assert '<form method="post" action="/instances' not in page.text and "Terminate" not in page.text
    assert 'name="csrf"' not in letters.text
    assert refused.status_code == 403 and "read-only" in refused.text
    assert (await control.get(instance_id)).status == "waiting"  # type: ignore[union-attr]


async def test_with_a_token_every_request_needs_it(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await _waiting_approval(producer, control)
    guarded = with_ui(settings, token="s3cret-token")
    async with dashboard(guarded) as http:
        page = await http.get(f"/instances/{instance_id}")
        assert page.status_code == 303
        assert page.headers["location"] == f"/login?next=/instances/{instance_id}"
        assert (await http.post(f"/instances/{instance_id}/terminate", data={})).status_code == 401
        assert (await http.get("/livez")).status_code == 200  # health checks show nothing: open
        wrong = await http.post("/login", data={"token": "guess", "next": "/"}, headers={"Origin": BASE_URL})
        assert wrong.status_code == 401 and "not the token" in wrong.text
        right = await http.post(
            "/login",
            data={"token": "s3cret-token", "next": f"/instances/{instance_id}"},
            headers={"Origin": BASE_URL},
        )
        assert (right.status_code, right.headers["location"]) == (303, f"/instances/{instance_id}")
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "s3cret-token" not in cookie
        assert (await http.get(f"/instances/{instance_id}")).status_code == 200  # the cookie is kept
        assert "s3cret-token" not in (await http.get("/")).text
    async with dashboard(guarded) as bearer:
        answer = await bearer.get("/", headers={"Authorization": "Bearer s3cret-token"})
        assert answer.status_code == 200
        off_site = await bearer.post("/login", data={"token": "s3cret-token", "next": "//evil.example"})
        assert off_site.headers["location"] == "/"  # no open redirect after the login


async def test_no_page_shows_a_connection_url(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await _finished(producer, control, "sequence", SEQUENCE)
    async with dashboard(settings) as http:
        bodies = [
            (await http.get(url)).text
            for url in (
                "/",
                "/instances",
                f"/instances/{instance_id}",
                "/dead-letters",
                "/schedules",
                "/nope",
            )
        ]
    for body in bodies:
        assert settings.database not in body and settings.amqp not in body
        assert "guest:guest" not in body and "postgresql://" not in body and "sqlite:///" not in body


async def test_dead_letters_are_listed_replayed_and_discarded(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    start_key = routing_key("start", "sequence")
    await publish_raw(settings.amqp, settings.namespace, start_key, b"{not json <b>", {})
    late = json.dumps({"v": 1, "kind": "start", "workflow": "nope", "instance_id": "late-1", "params": None})
    await publish_raw(settings.amqp, settings.namespace, start_key, late.encode(), {})
    await eventually(lambda: dead_letter_count(settings.amqp, settings.namespace), check=lambda n: n == 2)

    async with dashboard(settings) as http:
        page = await http.get("/dead-letters")
        assert page.status_code == 200
        text = _text(page.text)
        assert "not valid JSON" in text and "unknown workflow 'nope'" in text
        assert (
            start_key in text and "{not json <b>" in text and "<b>" not in page.text.replace("&lt;b&gt;", "")
        )
        letters = await control.dead_letters.list()
        discarded = await post_action(
            http, "/dead-letters/discard", {"id": letters[0].id}, from_page="/dead-letters"
        )
        assert (discarded.status_code, discarded.headers["location"]) == (303, "/dead-letters?done=discard")
        replayed = await post_action(
            http, "/dead-letters/replay", {"id": letters[1].id}, from_page="/dead-letters"
        )
        assert replayed.status_code == 303
        missing = await post_action(
            http, "/dead-letters/discard", {"id": letters[0].id}, from_page="/dead-letters"
        )
        assert missing.status_code == 409 and "no dead letter has id" in missing.text
    # The replayed start (still for an unknown workflow) comes back with the same reason.
    remaining = await eventually(control.dead_letters.list, check=lambda found: len(found) == 1)
    assert "unknown workflow 'nope'" in remaining[0].reason


async def test_schedules_show_next_fire_times_and_pause_resume_trigger(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    await control.create_schedule("hourly-sum", "sequence", Schedule("0 * * * *", params=SEQUENCE))
    async with dashboard(settings) as http:
        page = await http.get("/schedules")
        assert page.status_code == 200
        next_hour = (datetime.now(UTC) + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
        assert f"{next_hour:%Y-%m-%d %H:%M:%S} UTC" in page.text
        paused = await post_action(http, "/schedules/pause", {"id": "hourly-sum"}, from_page="/schedules")
        assert paused.status_code == 303 and (await control.get_schedule("hourly-sum")).paused
        assert (
            await post_action(http, "/schedules/resume", {"id": "hourly-sum"}, from_page="/schedules")
        ).status_code == 303
        assert not (await control.get_schedule("hourly-sum")).paused
        triggered = await post_action(
            http, "/schedules/trigger", {"id": "hourly-sum"}, from_page="/schedules"
        )
        assert triggered.status_code == 303
        shown = await http.get(triggered.headers["location"])
    started = (await control.get_schedule("hourly-sum")).last_instance_id
    assert started is not None and started.startswith("hourly-sum@")
    assert f'href="/instances/{quote(started, safe="")}"' in shown.text
    await control.wait(started, timeout=30)


async def test_unknown_instance_and_page_answer_404(settings: Settings) -> None:
    async with dashboard(settings) as http:
        missing = await http.get("/instances/no-such-id")
        nowhere = await http.get("/no/such/page")
        ready = await http.get("/readyz")
    assert missing.status_code == 404 and "no instance has id 'no-such-id'" in html.unescape(missing.text)
    assert nowhere.status_code == 404
    assert ready.status_code == 200 and ready.json() == {"ready": True, "database": True}


@pytest.mark.parametrize(
    "query",
    [
        "workflow=a%00b",  # PostgreSQL refuses NUL in a text parameter
        "build=%00",
        "after=2026-01-01T00:00&after_id=x%00",
        "after=9999-12-31T23:59:59-12:00&after_id=x",  # past datetime's range once in UTC
        "since=0001-01-01T00:00%2B14:00",
    ],
)
async def test_bad_filter_input_answers_400_not_500(settings: Settings, query: str) -> None:
    async with dashboard(settings) as http:
        response = await http.get(f"/instances?{query}")
    assert response.status_code == 400
    assert "is not" in html.unescape(response.text) or "not allowed" in response.text


@pytest.mark.postgres_only("counts the dashboard's connections in pg_stat_activity")
async def test_the_dashboard_keeps_one_named_connection_budget(settings: Settings) -> None:
    bounded = settings.model_copy(update={"db": DatabaseSettings(max_connections=2)})
    name = f"stepline-ui {this_process()}"
    async with dashboard(bounded) as http:
        pages = await asyncio.gather(*(http.get(path) for path in ["/", "/instances", "/schedules"] * 3))
        assert [page.status_code for page in pages] == [200] * 9
        async with await psycopg.AsyncConnection.connect(settings.database, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name[:63],)
            )
            row = await cursor.fetchone()
    assert row is not None and 1 <= row[0] <= 2, f"{row} connections named {name!r}; the budget is 2"


async def test_the_overview_reads_the_outbox_once_for_every_instance_it_diagnoses(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    lost = [await lost_step(producer, control, settings) for _ in range(2)]
    for instance_id in lost:
        await age(settings.database, instance_id, timedelta(hours=1))
    scans: list[str] = []

    def count_outbox_scans(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.startswith("SELECT outbox.body \nFROM outbox"):  # inspect.outbox_instance_ids
            scans.append(statement)

    event.listen(Engine, "before_cursor_execute", count_outbox_scans)
    try:
        async with dashboard(settings) as http:
            page = await http.get("/")
    finally:
        event.remove(Engine, "before_cursor_execute", count_outbox_scans)
    assert page.status_code == 200
    text = _text(page.text)
    assert all(f"{instance_id} slow-pair — stranded" in text for instance_id in lost)
    assert len(scans) == 1, f"the outbox was read {len(scans)} times for {len(lost)} diagnoses"
