"""Labelling under concurrency, crashes and path games, through the real ``glmtune web`` server.

- M writers at once through Gradio's HTTP API (``gradio_client``, one session each, as M browser tabs):
  each appends rows and loads + saves its own earlier rows. Afterwards the file parses with the reader
  training uses and holds exactly the expected rows (every append once, every row's last edit).
- SIGKILL mid-write: a process appending through :class:`LabelStore` is killed K times (6; 40 in
  the slow run) at random moments; after each kill the file parses and holds every acknowledged row in order (at most one
  more: the row whose ``os.replace`` had happened when the kill landed), and the next writer sweeps the
  temporary file the dead one left.
- Path escape: the Gradio file routes refuse the dataset, the feedback log, ``/etc/passwd`` and
  ``..`` traversals (plain and URL-encoded); row-number parameters that are paths or junk are refused
  with a message and change nothing.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")

from glmtune.data import read_examples  # noqa: E402
from glmtune.web.app import build_app  # noqa: E402
from glmtune.web.core import Backend  # noqa: E402
from glmtune.web.store import FeedbackLog, LabelStore  # noqa: E402
from glmtune.web.testing import serve_in_background  # noqa: E402


class EchoEngine:
    def stream(self, messages, settings=None):
        yield "ok"


def outputs(path: Path) -> list[str]:
    """The answers of the file's rows, read the way training reads them."""
    return [e.messages[-1]["content"] for e in read_examples(path).examples]


def temp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def web(tmp_path):
    data = tmp_path / "labels" / "data.jsonl"
    store = LabelStore(data)
    feedback = FeedbackLog(tmp_path / "labels" / "feedback.jsonl", model="echo")
    feedback.append("q", "a", "good")
    store.append("seed", "", "seed row")
    app = build_app(Backend(EchoEngine(), model="echo"), store=store, feedback=feedback)
    with serve_in_background(app) as url:
        yield url, store, feedback


# ----------------------------------------------------------------------------- concurrent writers
def writer(url: str, w: int, appends: int, rng: random.Random, errors: list, edits: dict) -> None:
    try:
        client = gradio_client.Client(url, verbose=False)
        mine: list[int] = []
        for i in range(appends):
            status, *_ = client.predict(
                "context_target", f"writer {w}", str(i), f"w{w}-{i}", api_name="/add_row"
            )
            assert status.startswith("✓ added row"), status
            mine.append(int(status.rsplit(" ", 1)[1]))
            if mine and rng.random() < 0.5:
                # Edit one of this writer's rows: rows never move (nobody deletes here), so the number
                # returned by add_row still names it.
                n = rng.choice(mine)
                loaded = client.predict(n, api_name="/load_row")
                assert loaded[0].startswith(f"row {n} loaded"), loaded
                text = f"w{w}-edit-{n}-{i}"
                status, *_ = client.predict(loaded[1], loaded[2], loaded[3], text, api_name="/save_row")
                assert status == f"✓ saved row {n}", status
                edits[n] = text
        client.close()
    except Exception as e:  # reported by the test
        errors.append(f"writer {w}: {type(e).__name__}: {e}")


def test_concurrent_writers_through_the_web_server(web):
    url, store, _ = web
    m, appends = 6, 8
    errors: list[str] = []
    edits: list[dict] = [{} for _ in range(m)]
    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=writer, args=(url, w, appends, random.Random(w), errors, edits[w]))
        for w in range(m)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    seconds = time.perf_counter() - t0

    got = outputs(store.path)
    rows = store.rows()
    assert len(got) == len(rows) == 1 + m * appends
    assert got[0] == "seed row"
    # Every append exactly once (under its own number), each edited row holding its writer's last edit.
    expected = {}
    for row in rows[1:]:
        who, rest = row["context"].split("\nInput: ")
        expected.setdefault(who, []).append(int(rest.split("\n")[0]))
    assert all(sorted(v) == list(range(appends)) for v in expected.values()) and len(expected) == m
    edited = {n: text for d in edits for n, text in d.items()}
    for n, text in edited.items():
        assert got[n - 1] == text
    untouched = [out for k, out in enumerate(got[1:], start=2) if k not in edited]
    assert all(out.startswith("w") and "-edit-" not in out for out in untouched)
    assert temp_leftovers(store.path.parent) == []
    print(
        f"[figure] labelling: {m} web clients, {m * appends} appends + {sum(map(len, edits))} edited rows "
        f"in {seconds:.1f} s; file parses, {len(got)} rows = expected, lost 0, temp files left 0"
    )


# ----------------------------------------------------------------------------- crash mid-write
APPENDER = """
import sys
from glmtune.web.store import LabelStore
store = LabelStore(sys.argv[1])
start = store.count()
for i in range(start, 100000):
    store.append("crash test", str(i), f"row-{i}")
    print(i, flush=True)
"""


@pytest.mark.parametrize("kills", [6, pytest.param(40, marks=pytest.mark.slow)])
def test_sigkill_mid_write_leaves_a_whole_file(tmp_path, kills):
    path = tmp_path / "data.jsonl"
    rng = random.Random(kills)
    torn, extra_rows, swept = 0, 0, 0
    acked = -1
    for k in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(path)], stdout=subprocess.PIPE, text=True, bufsize=1
        )
        # Let it append for a random while (each append rewrites the whole file: writes are long).
        first = proc.stdout.readline()
        assert first, "the appender did not start"
        acked = int(first)
        time.sleep(rng.uniform(0.01, 0.3))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        acked = max([acked, *(int(x) for x in rest.split())])
        try:
            got = outputs(path)
        except Exception as e:  # a torn file is exactly the failure this looks for
            torn += 1
            raise AssertionError(f"kill {k + 1}: the file does not parse: {e}") from None
        # Every acknowledged row, in order; at most one more (replaced, not yet acknowledged).
        assert got[: acked + 1] == [f"row-{i}" for i in range(acked + 1)]
        assert len(got) - (acked + 1) in (0, 1), (len(got), acked)
        extra_rows += len(got) - (acked + 1)
        left = temp_leftovers(tmp_path)
        if left:
            # The next writer holds the lock, so nobody else is writing: it sweeps the dead one's file.
            LabelStore(path).append("sweep", "", "sweep")
            assert temp_leftovers(tmp_path) == []
            LabelStore(path).delete(LabelStore(path).count())
            swept += len(left)
    print(
        f"[figure] labelling crash: {kills} SIGKILLs mid-append, files torn {torn}, rows lost 0 "
        f"({len(outputs(path))} rows; {extra_rows} kills landed after the replace, before the ack); "
        f"temp files left by a kill and swept by the next write: {swept}"
    )


# ----------------------------------------------------------------------------- path escape
def test_paths_cannot_escape_the_data_folder(web, tmp_path):
    url, store, feedback = web
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    before = store.path.read_bytes()
    targets = [
        str(store.path),
        str(feedback.path),
        str(secret),
        "/etc/passwd",
        "../../../../../../etc/passwd",
        f"{store.path.parent}/../secret.txt",
        "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
    ]
    served = []
    for target in targets:
        for route in ("/gradio_api/file=", "/file=", "/gradio_api/static/", "/static/", "/assets/"):
            r = httpx.get(url + route + target, timeout=10)
            if r.status_code == 200 and (
                b"TOP SECRET" in r.content or b"root:" in r.content or before in r.content
            ):
                served.append(f"{route}{target}")
    assert served == [], served

    client = gradio_client.Client(url, verbose=False)
    for junk in ["../../etc/passwd", str(secret), "1; rm -rf /", -1, 0, 10**9, 1.5]:
        try:
            status = client.predict(junk, api_name="/load_row")[0]
        except Exception as e:  # refused by Gradio's own input check (a Number field)
            status = f"refused by gradio: {type(e).__name__}"
        assert not status.startswith("row "), (junk, status)
        try:
            client.predict(junk, api_name="/delete_row")
        except Exception:
            pass
    client.close()
    assert store.path.read_bytes() == before
    assert secret.read_text() == "TOP SECRET"
    print(
        f"[figure] labelling paths: {len(targets) * 5} file-route requests served nothing outside the "
        "app; 7 junk row numbers changed nothing"
    )
