"""Preemption notices from a Google Cloud VM's metadata server (a local stand-in here) become the
SIGTERM the training loop stops on (the loop's own handling of SIGTERM: tests/test_cloud_storage.py,
and tests/test_train.py's two-host test)."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from idefics_jax.train.preemption import MetadataWatch, PreemptionWatch


class MetadataServer(http.server.ThreadingHTTPServer):
    """Answers `/computeMetadata/v1/instance/{preempted,maintenance-event}` as GCE's server does
    (403 without the `Metadata-Flavor: Google` header); `answers` may be changed while it runs."""

    def __init__(self):
        self.answers = {"preempted": "FALSE", "maintenance-event": "NONE"}
        self.status = 200
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                key = self.path.removeprefix("/computeMetadata/v1/instance/")
                status = server.status if key in server.answers else 404
                if self.headers.get("Metadata-Flavor") != "Google":
                    status = 403
                body = server.answers.get(key, "").encode() if status == 200 else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server():
    s = MetadataServer()
    yield s
    s.shutdown()


def wait_for(condition, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_terminating_maintenance_event_stops_the_loop_as_sigterm_does(server, monkeypatch):
    monkeypatch.setenv("GCE_METADATA_HOST", server.host)
    watch = PreemptionWatch()  # one process: takes SIGTERM, and starts reading the server
    try:
        assert wait_for(lambda: server.requests >= 4) and not watch.requested(1)
        server.answers["maintenance-event"] = "MIGRATE_ON_HOST_MAINTENANCE"  # the VM stays: no notice
        assert wait_for(lambda: server.requests >= 8) and not watch.requested(2)
        server.answers["maintenance-event"] = "TERMINATE_ON_HOST_MAINTENANCE"
        assert wait_for(lambda: watch.signalled)  # noted from the watch's thread
        assert watch.requested(3) and watch.stopped_at == 3
        assert watch.metadata.notice == "maintenance event TERMINATE_ON_HOST_MAINTENANCE"
    finally:
        watch.close()


def test_a_preempted_spot_vm_is_noticed_once_and_unavailable_answers_are_retried(server):
    notices = []
    server.status = 503  # the metadata server's own maintenance: retried
    watch = MetadataWatch(server.host, interval=0.01, notify=lambda: notices.append(time.monotonic()))
    assert wait_for(lambda: server.requests >= 3) and watch._thread.is_alive()
    server.status = 200
    server.answers["preempted"] = "TRUE"
    assert wait_for(lambda: notices) and wait_for(lambda: not watch._thread.is_alive())
    assert watch.notice == "preempted" and len(notices) == 1


def test_without_a_metadata_server_the_watch_ends_quietly(server):
    closed = MetadataServer()
    closed.shutdown()
    closed.server_close()  # nothing listens there now
    notices = []
    watch = MetadataWatch(closed.host, interval=0.01, notify=lambda: notices.append(1))
    assert wait_for(lambda: not watch._thread.is_alive()) and not notices
    server.answers.pop("preempted")  # a server that is not GCE's (404): not watched either
    watch = MetadataWatch(server.host, interval=0.01, notify=lambda: notices.append(1))
    assert wait_for(lambda: not watch._thread.is_alive()) and not notices
