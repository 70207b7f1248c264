"""
Webhooks: jobs finish on the first of webhook or poll; forgeries fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import sys
import time

import aiohttp
import anyio
import pytest

from aiohttp import web
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import FAST_RETRY, KEY, session_of, settled_tasks
from modelslab_async import (
    Client,
    FluxKleinText2Img,
    JobPhase,
    JobState,
    JobStatus,
    Text2Img,
)
from modelslab_async._state import hash_token
from modelslab_async.emulator import Faults
from modelslab_async.errors import (
    ClientStateError,
    SubmitUncertainError,
    WebhookError,
)
from modelslab_async.stores import SQLiteStore
from modelslab_async.webhooks import WebhookReceiver


pytestmark = pytest.mark.anyio


@pytest.fixture(name="receiver")
async def _receiver():
    """
    An embedded receiver; polling starts 2 s after a job's eta.
    """
    async with WebhookReceiver(grace=2.0) as receiver:
        yield receiver


@pytest.fixture(name="hooked")
async def _hooked(emulator, receiver):
    """
    A client whose jobs wait for webhooks, with no queue cap.
    """
    async with Client(
        KEY,
        base_url=emulator.url,
        retry=FAST_RETRY,
        webhooks=receiver,
        max_queued=None,
    ) as client:
        yield client


async def generate_many_by_gather(client, count, **fields):
    """
    ``count`` generate() calls at once, in input order.
    """
    return await asyncio.gather(
        *(
            client.generate(Text2Img(prompt=f"p{i}", **fields), timeout=30)
            for i in range(count)
        )
    )


def assert_outputs_are_the_emulators(emulator, results):
    """
    Each result carries the outputs the emulator made for that job.
    """
    assert len({r.id for r in results}) == len(results)
    for result in results:
        job = emulator.job(result.id)
        assert [
            o.url.rsplit("/", 1)[-1] for o in result.outputs
        ] == job.files()


async def test_200_jobs_resolve_by_webhook_alone(emulator, hooked):
    """With webhooks delivered, 200 jobs finish with zero fetches."""
    emulator.eta = 0.2

    results = await generate_many_by_gather(hooked, 200)

    assert emulator.requests("fetch") == []
    assert len(emulator.requests("webhook")) == 200
    assert_outputs_are_the_emulators(emulator, results)


async def test_lost_webhooks_fall_back_to_polling(emulator):
    """With every webhook dropped, all 200 jobs still finish by polling."""
    emulator.eta = 0.2
    emulator.faults = Faults(webhook_drop=1.0)
    async with (
        WebhookReceiver(grace=0.1) as receiver,
        Client(
            KEY,
            base_url=emulator.url,
            webhooks=receiver,
            max_queued=None,
            retry=FAST_RETRY,
        ) as client,
    ):
        results = await generate_many_by_gather(client, 200)

    assert emulator.requests("webhook") == []
    assert emulator.faults.injected["webhook", "drop"] == 200
    assert {r.job_id for r in emulator.requests("fetch")} == {
        r.id for r in results
    }
    assert_outputs_are_the_emulators(emulator, results)


async def test_duplicated_webhooks_resolve_each_job_once(emulator, hooked):
    """With every webhook sent twice, each job resolves once, correctly."""
    emulator.eta = 0.2
    emulator.faults = Faults(webhook_duplicate=1.0)

    results = await generate_many_by_gather(hooked, 200)
    await asyncio.sleep(0.2)  # let the second copies land

    webhooks = emulator.requests("webhook")
    assert len(webhooks) == 400
    assert {w.status for w in webhooks} == {200}
    assert emulator.requests("fetch") == []
    assert_outputs_are_the_emulators(emulator, results)


async def test_a_webhook_before_the_submit_answer(emulator, hooked):
    """A webhook that beats the submit's answer is kept, not lost."""
    emulator.eta = 0.01
    emulator.faults = Faults(
        schedule={"submit": ["slow_body"]}, stall_seconds=4
    )

    job = await hooked.submit(Text2Img(prompt="p"))

    # The answer said "processing"; the webhook that came first settled it.
    assert job.status is JobStatus.SUCCESS
    (webhook,) = emulator.requests("webhook")
    assert webhook.status == 200
    assert (await job).id == emulator.requests("submit")[0].job_id
    assert emulator.requests("fetch") == []


async def callback(emulator):
    """
    The callback URL the emulator was given, from its submit record.
    """
    return emulator.requests("submit")[-1].body["webhook"]


async def test_forged_callbacks_are_refused(emulator, hooked, receiver):
    """Wrong tokens, foreign ids, garbage and floods resolve nothing."""
    emulator.eta = 0.5
    job = await hooked.submit(FluxKleinText2Img(prompt="p"))
    url = await callback(emulator)
    base, reg_id, token = url.rsplit("/", 2)
    good = {"status": "success", "id": job.id, "track_id": job.track_id,
            "output": ["https://evil.example/x.png"]}  # fmt: skip
    attempts = {
        "wrong token": (f"{base}/{reg_id}/{token[:-2]}xx", good, None),
        "unknown registration": (f"{base}/0000/{token}", good, None),
        "another job's id": (url, {**good, "id": "999"}, None),
        "another job's track id": (
            url,
            {**good, "track_id": "mla-other"},
            None,
        ),
        "no ids at all": (url, {"status": "success", "output": []}, None),
        "garbage": (url, b"\x00\xffnot json", None),
        "not an object": (url, [1, 2, 3], None),
        "oversized": (url, b"x" * (receiver.max_body_size + 1), None),
        "wrong content type": (url, good, "text/plain"),
    }
    answers = {}
    async with aiohttp.ClientSession() as http:
        for name, (target, body, content_type) in attempts.items():
            raw = (
                body if isinstance(body, bytes) else json.dumps(body).encode()
            )
            headers = {"Content-Type": content_type or "application/json"}
            data = io.BytesIO(raw)  # aiohttp warns about big raw bodies
            async with http.post(
                target, data=data, headers=headers
            ) as response:
                answers[name] = (response.status, await response.read())

    assert {name: status for name, (status, _) in answers.items()} == {
        "wrong token": 404,
        "unknown registration": 404,
        "another job's id": 400,
        "another job's track id": 400,
        "no ids at all": 400,
        "garbage": 400,
        "not an object": 400,
        "oversized": 413,
        "wrong content type": 415,
    }
    assert all(b"999" not in body for _, body in answers.values())
    assert job.status is JobStatus.PROCESSING
    result = await job
    assert "evil" not in result.outputs[0].url
    assert emulator.requests("fetch") == []


async def test_late_and_repeated_webhooks_are_ignored(emulator, hooked):
    """A webhook for a finished job gets 200 and changes nothing."""
    emulator.eta = 0.05
    result = await hooked.generate(Text2Img(prompt="p"))
    url = await callback(emulator)
    forged_late = {"status": "failed", "id": result.id, "message": "late"}

    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=forged_late) as response,
    ):
        status = response.status

    assert status == 200
    assert result.response.status is JobStatus.SUCCESS


_SENDER = """
import asyncio, json, sys
import aiohttp
import anyio

async def main(url, body):
    async def send(http):
        async with http.post(url, json=body) as response:
            return response.status
    # Two connections for 100 calls: each is reused while busy.
    connector = aiohttp.TCPConnector(limit=2)
    async with aiohttp.ClientSession(connector=connector) as http:
        print(json.dumps(await asyncio.gather(*(send(http) for _ in range(100)))))

asyncio.run(main(sys.argv[1], json.load(sys.stdin)))
"""


async def test_duplicates_on_one_connection_all_get_200(emulator, hooked):
    """Repeated callbacks over kept-alive connections each get a 200."""
    emulator.eta = 0.05
    result = await hooked.generate(Text2Img(prompt="p"))
    url = await callback(emulator)
    # Larger than one read of the socket: some of it is unread when the
    # receiver answers, unless it reads the body.
    meta = {"prompt": "a lighthouse " * 20_000}
    again = json.dumps(
        {"status": "success", "id": result.id, "output": ["x"], "meta": meta}
    )

    # Another process, as ModelsLab is: one event loop would hide the race
    # between the receiver closing a connection and the sender reusing it.
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SENDER, url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    with anyio.fail_after(30):
        out, _ = await sender.communicate(again.encode())

    assert sender.returncode == 0
    assert json.loads(out) == [200] * 100


async def test_verify_by_fetch(emulator):
    """verify='fetch' checks a webhook's claim before believing it."""
    emulator.eta = 0.6
    async with (
        WebhookReceiver(verify="fetch", grace=5) as receiver,
        Client(KEY, base_url=emulator.url, webhooks=receiver) as client,
    ):
        job = await client.submit(Text2Img(prompt="p"))
        waiter = asyncio.create_task(job.wait())
        url = await callback(emulator)
        lie = {"status": "success", "id": job.id, "track_id": job.track_id,
               "output": ["https://evil.example/x.png"]}  # fmt: skip
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json=lie) as response,
        ):
            assert response.status == 200
        await asyncio.sleep(0.1)
        assert emulator.fetches(job.id) == 1  # checked at once...
        assert not waiter.done()  # ...and not believed

        result = await waiter

    assert "evil" not in result.outputs[0].url
    assert emulator.fetches(job.id) == 2  # the real webhook, verified


@contextlib.asynccontextmanager
async def user_app(build):
    """
    Serve an app the way a deployment does: its URL known before it starts.

    *build(base_url)* returns the application; we serve it on that URL.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    runner = web.AppRunner(build(base_url))
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield base_url
    finally:
        await runner.cleanup()
        sock.close()


async def health(_: web.Request) -> web.Response:
    """
    One of the user's own routes.
    """
    return web.Response(text="ok")


async def test_mounted_in_an_existing_aiohttp_app(emulator):
    """add_routes() serves callbacks from the user's own aiohttp app."""
    emulator.eta = 0.1
    receivers = []

    def build(base_url: str) -> web.Application:
        receiver = WebhookReceiver(
            public_url=f"{base_url}/modelslab/webhooks/", serve=False
        )
        receivers.append(receiver)
        app = web.Application()
        app.router.add_get("/health", health)
        receiver.add_routes(app)
        return app

    async with user_app(build) as base_url:
        async with Client(
            KEY, base_url=emulator.url, webhooks=receivers[0]
        ) as c:
            results = await asyncio.gather(
                *(c.generate(Text2Img(prompt=f"p{i}")) for i in range(5))
            )
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{base_url}/health") as response,
        ):
            assert await response.text() == "ok"

    assert len(results) == 5
    assert emulator.requests("fetch") == []
    assert [w.status for w in emulator.requests("webhook")] == [200] * 5


async def test_mounted_as_a_sub_app(emulator):
    """app() mounts under a prefix with add_subapp()."""
    emulator.eta = 0.1
    receivers = []

    def build(base_url: str) -> web.Application:
        receiver = WebhookReceiver(
            public_url=f"{base_url}/hooks/modelslab/webhooks/", serve=False
        )
        receivers.append(receiver)
        app = web.Application()
        app.add_subapp("/hooks", receiver.app())
        return app

    async with (
        user_app(build),
        Client(KEY, base_url=emulator.url, webhooks=receivers[0]) as client,
    ):
        await client.generate(Text2Img(prompt="p"))

    assert emulator.requests("fetch") == []
    assert emulator.requests("webhook")[0].status == 200


def test_serve_false_needs_a_public_url():
    """A receiver served by someone else must know its public URL."""
    with pytest.raises(WebhookError, match="public_url"):
        WebhookReceiver(serve=False)
    with pytest.raises(WebhookError, match="not started"):
        _ = WebhookReceiver().url


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=12,
)
PAYLOAD = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(
            ["success", "failed", "error", "processing", "x"]
        )
        | JSON,
        "id": st.sampled_from(["1", 1, "2"]) | JSON,
        "track_id": st.sampled_from(["t-1", "t-2"]) | JSON,
        "output": st.lists(st.text()) | JSON,
        "meta": JSON,
        "generationTime": JSON,
        "eta": JSON,
    },
)


class FakeJob:
    """
    Just enough of a job for the receiver: id "1", track_id "t-1".
    """

    id = "1"
    resolved = None

    def take_webhook(self, response):
        if response.id not in (None, self.id):
            return False
        self.resolved = response
        return True


@given(
    path=st.text() | st.just("/modelslab/webhooks/REG/TOKEN"),
    body=st.binary() | JSON.map(lambda v: json.dumps(v).encode()) | PAYLOAD.map(lambda v: json.dumps(v).encode()),
    content_type=st.none() | st.sampled_from(["application/json", "text/html", "application/json; charset=utf-8", ""]) | st.text(),
)  # fmt: skip
@example(
    path="/modelslab/webhooks/REG/TOKEN",
    body=b'{"status": "success", "id": "1", "eta": 1' + b"0" * 400 + b"}",
    content_type=None,
)
def test_dispatch_never_fails_on_anything(path, body, content_type):
    """Random paths, bytes and JSON get a 2xx/4xx, never an exception."""
    receiver = WebhookReceiver(public_url="http://x/", serve=False)
    registration = receiver.register("t-1")
    job = FakeJob()
    registration.subscribe(job.take_webhook)
    _, reg_id, token = registration.url.rsplit("/", 2)
    path = path.replace("REG", reg_id).replace("TOKEN", token)

    status = receiver.dispatch(path, body, content_type)

    assert status in {200, 400, 404, 413, 415}
    if job.resolved is not None:
        assert status == 200
        assert job.resolved.id in (None, "1")
        assert job.resolved.track_id in (None, "t-1")


async def test_http_route_survives_random_requests(receiver):
    """The receiver's HTTP route answers random bodies without a 5xx."""
    registration = receiver.register("t-1")
    registration.subscribe(FakeJob().take_webhook)
    url = registration.url
    bodies = [b"", b"{", b"[]", b'{"status": 1}', b"\xff" * 100,
              b'{"status": "success", "id": 1e999}', b"[" * 5000 + b"]" * 5000]  # fmt: skip
    async with aiohttp.ClientSession() as http:
        for body in bodies:
            async with http.post(url, data=body) as response:
                assert response.status < 500, body[:20]
        async with http.get(url) as response:
            assert response.status == 405


async def test_closing_the_client_leaves_nothing(emulator):
    """Closing a client with waiting webhook jobs leaves no task or socket."""
    emulator.eta = 30
    receiver = WebhookReceiver()
    client = Client(KEY, base_url=emulator.url, webhooks=receiver)
    jobs = [await client.submit(Text2Img(prompt=f"p{i}")) for i in range(3)]
    waiters = [asyncio.create_task(job.wait()) for job in jobs]
    await asyncio.sleep(0.05)
    url = receiver.url

    await client.aclose()

    for waiter in waiters:
        with pytest.raises(ClientStateError):
            await waiter
    assert session_of(client).closed
    assert not receiver.is_ready  # the client owned it and stopped it
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.post(url + "x/y", data=b"{}")
    await emulator.aclose()  # its pending webhook deliveries too
    assert await settled_tasks() == set()


async def test_closing_the_receiver_falls_back_to_polling(emulator):
    """A receiver closed under waiting jobs leaves them to polling."""
    emulator.eta = 0.2
    receiver = WebhookReceiver(grace=0.1)
    await receiver.start()
    async with Client(KEY, base_url=emulator.url, webhooks=receiver) as client:
        job = await client.submit(Text2Img(prompt="p"))
        await receiver.aclose()

        result = await job

    assert result.outputs
    assert emulator.fetches(job.id) >= 1
    assert await settled_tasks() == set()


async def test_recover_finds_a_job_made_by_an_uncertain_submit(
    emulator, hooked
):
    """A submit cut off after the job was made is found by its webhook."""
    emulator.eta = 0.1
    emulator.faults = Faults(schedule={"submit": ["reset_after"]})

    with pytest.raises(SubmitUncertainError) as caught:
        await hooked.submit(Text2Img(prompt="p"))
    job = await hooked.recover(caught.value, timeout=5)

    assert emulator.jobs_created == 1  # never sent twice
    assert job is not None
    assert job.track_id == caught.value.track_id
    assert job.status is JobStatus.SUCCESS
    assert (await job).outputs


async def test_recover_returns_none_when_no_job_was_made(emulator, hooked):
    """A submit cut off before the job existed recovers to None."""
    emulator.faults = Faults(schedule={"submit": ["reset_before"]})

    with pytest.raises(SubmitUncertainError) as caught:
        await hooked.submit(Text2Img(prompt="p"))

    assert await hooked.recover(caught.value, timeout=0.3) is None
    assert emulator.jobs_created == 0


async def test_recover_needs_webhooks(client):
    """Without a receiver there is nothing to recover with."""
    error = SubmitUncertainError("x", track_id="t")

    with pytest.raises(WebhookError, match="WebhookReceiver"):
        await client.recover(error)


TOKEN = "journal-token-0123456789abcdef"
WEBHOOK_ID = "0123456789abcdef"


class OneJobJournal:
    """
    A journal that knows one queued job, for a receiver bound to it.

    *fail* names the call that raises a foreign error; *during_find* runs
    while the receiver looks the callback up.
    """

    def __init__(self, *, fail=None, during_find=None) -> None:
        now = time.time()
        self.state = JobState(
            track_id="t-journal",
            endpoint="v6",
            phase=JobPhase.QUEUED,
            job_id="42",
            webhook_id=WEBHOOK_ID,
            token_hash=hash_token(TOKEN),
            created_at=now,
            updated_at=now,
        )
        self.fail = fail
        self.during_find = during_find
        self.recorded: list[JobState] = []

    async def find(self, webhook_id):
        """
        The job, if *webhook_id* is its registration.
        """
        if self.fail == "find":
            raise RuntimeError("pool exhausted")
        if self.during_find is not None:
            self.during_find()
        return self.state if webhook_id == WEBHOOK_ID else None

    async def record(self, state):
        """
        Keep *state*.
        """
        if self.fail == "record":
            raise RuntimeError("disk I/O error")
        self.recorded.append(state)
        return state


SETTLED = json.dumps(
    {
        "status": "success",
        "id": "42",
        "track_id": "t-journal",
        "output": ["https://cdn.example/42.png"],
    }
).encode()


async def post_callback(receiver, path: str) -> int:
    """
    POST the job's success callback to the receiver's own server.
    """
    base = receiver.url.split("/", 3)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            "/".join(base[:3]) + path,
            data=SETTLED,
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        return response.status


def not_quiet(caplog) -> list[str]:
    """
    Log lines with a traceback or at ERROR.
    """
    return [
        r.getMessage()
        for r in caplog.records
        if r.exc_info or r.levelno >= logging.ERROR
    ]


async def test_a_callback_judged_as_its_client_closes_is_recorded(
    receiver, caplog
):
    """The journal judged with records the callback, though unbound since."""
    journal = OneJobJournal(during_find=lambda: receiver.bind(None))
    receiver.bind(journal)
    path = f"{receiver.path}{WEBHOOK_ID}/{TOKEN}"

    with anyio.fail_after(10):
        status = await post_callback(receiver, path)

    assert status == 200
    assert [s.phase for s in journal.recorded] == [JobPhase.SUCCEEDED]
    assert not_quiet(caplog) == []


@pytest.mark.parametrize("route", ["http", "receive"])
@pytest.mark.parametrize("fail", ["find", "record"])
async def test_a_failing_journal_gets_503_and_one_line(
    receiver, caplog, route, fail
):
    """A journal that raises anything: 503 and one line, no traceback."""
    caplog.set_level(logging.DEBUG, logger="modelslab_async")
    receiver.bind(OneJobJournal(fail=fail))
    path = f"{receiver.path}{WEBHOOK_ID}/{TOKEN}"

    with anyio.fail_after(10):
        if route == "http":
            status = await post_callback(receiver, path)
        else:
            status = await receiver.receive(path, SETTLED, "application/json")

    assert status == 503
    assert not_quiet(caplog) == []
    lines = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1
    assert "RuntimeError" in lines[0].getMessage()


async def test_a_callback_as_its_journal_closes_gets_503(
    receiver, tmp_path, caplog
):
    """A journal closed between judging and recording: 503, one line."""
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    journal = await store.open("acct", max_queued=None)
    await journal.record(OneJobJournal().state)

    class Closing:
        """
        The SQLite journal, closed by its client as a callback is judged.
        """

        async def find(self, webhook_id):
            """
            Find the job, then close as the client does.
            """
            found = await journal.find(webhook_id)
            receiver.bind(None)
            await journal.aclose()
            return found

        async def record(self, state):
            """
            Record in the (closed) journal.
            """
            return await journal.record(state)

    receiver.bind(Closing())
    path = f"{receiver.path}{WEBHOOK_ID}/{TOKEN}"

    with anyio.fail_after(10):
        status = await post_callback(receiver, path)

    assert status == 503
    assert not_quiet(caplog) == []
