"""`masquerade serve --ray-replicas 2` on a local Ray cluster: two CPU engine replicas on tiny models.

One real server process for the module, started through the real CLI (the front end
in that process, the engines as Ray Serve replicas), talked to over raw gRPC stubs so
that no client-side retry hides a status code. The tests run in file order; the last
one sends SIGTERM and checks that every process of the Ray cluster is gone.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from masquerade.api.protos import SERVICE_NAME, pb2, pb2_grpc

pytestmark = pytest.mark.ray

START_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _request(request_id: str, steps: int = 12) -> pb2.AnonymizeRequest:
    return pb2.AnonymizeRequest(
        request_id=request_id,
        image=_png(),
        method=pb2.REVERSE_PERSONALIZATION,
        params=pb2.ReversePersonalizationParams(steps=steps, skip=0.5),
        detection=pb2.DetectionOptions(aligned=True),
    )


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in ticks) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every process below ``root``: pid -> start time (so a reused pid is not mistaken for it)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry))
                starts[int(entry)] = stat[2]
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = starts[child]
                todo.append(child)
    return found


def _still_running(processes: dict[int, int]) -> list[int]:
    alive = []
    for pid, start in processes.items():
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == start and stat[1] != "Z":
            alive.append(pid)
    return alive


def _pid_of(served_by: str) -> int:
    return int(served_by.rsplit(":", 1)[1])  # "<replica id>@<host>:<pid>"


class RayServer:
    def __init__(self, model_dir: Path, log_path: Path, spool_dir: Path):
        self.port = _free_port()
        self.spool_dir = spool_dir
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        command = [
            sys.executable,
            "-m",
            "masquerade.cli",
            "serve",
            "--ray-replicas",
            "2",
            "--model-dir",
            str(model_dir),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            "0",
            "--max-queue",
            "16",
            "--grace-seconds",
            "3",
            "--drain-seconds",
            "3",
            "--video-spool-dir",
            str(spool_dir),
        ]
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb2_grpc.AnonymizerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def log_tail(self, lines: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> None:
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                reply = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2)
                last = reply.status
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                last = error.code()
            time.sleep(0.5)
        raise AssertionError(f"not SERVING within {timeout}s (last: {last}):\n{self.log_tail()}")

    def stream(self, request: pb2.AnonymizeRequest, progress: list | None = None, timeout: float = 120.0):
        """Runs one AnonymizeStream: ("OK", served_by) or (status code name, details)."""
        return self.timed_stream(request, progress, timeout)[:2]

    def timed_stream(self, request: pb2.AnonymizeRequest, progress: list | None = None, timeout: float = 120.0):
        """As ``stream``, plus the monotonic time the outcome arrived."""
        try:
            result = None
            for event in self.stub.AnonymizeStream(request, timeout=timeout):
                if event.HasField("progress") and progress is not None:
                    progress.append(request.request_id)
                if event.HasField("result"):
                    result = event.result
            assert result is not None, "stream ended without a result"
            return "OK", result.served_by, time.monotonic()
        except grpc.RpcError as error:
            return error.code().name, error.details(), time.monotonic()

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._log.close()


@pytest.fixture(scope="module")
def ray_server(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    server = RayServer(tiny_model_dir, folder / "serve.log", folder / "spool")
    try:
        server.wait_serving()
        yield server
    finally:
        processes = _descendants(server.process.pid) if server.process.poll() is None else {}
        server.stop()
        for pid in _still_running(processes):  # only if a test failed before the shutdown test
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def replica_pids() -> set[int]:
    return set()


def test_health_reflection_and_server_info(ray_server):
    assert ray_server.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    reflection = reflection_pb2_grpc.ServerReflectionStub(ray_server.channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    info = ray_server.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=30)
    assert info.replicas == 2
    assert info.device == "cpu"
    assert info.limits.max_queue == 16
    assert any(m.method == pb2.REVERSE_PERSONALIZATION and m.available for m in info.methods)


def test_twelve_concurrent_streams_all_succeed_on_both_replicas(ray_server, replica_pids):
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(lambda i: ray_server.stream(_request(f"s{i}")), range(12)))
    assert all(status == "OK" for status, _ in outcomes), outcomes
    served_by = {detail for _, detail in outcomes}
    assert len(served_by) == 2, f"both replicas should serve some of 12 concurrent streams: {outcomes}"
    replica_pids.update(_pid_of(s) for s in served_by)
    assert os.getpid() not in replica_pids and ray_server.process.pid not in replica_pids


def test_unary_and_errors_come_from_the_replica_unchanged(ray_server):
    response = ray_server.stub.Anonymize(_request("u1"), timeout=120)
    assert response.request_id == "u1" and response.served_by and response.image
    bad = _request("u2")
    bad.params.skip = 1.5
    with pytest.raises(grpc.RpcError) as caught:
        ray_server.stub.Anonymize(bad, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "skip" in caught.value.details()


def test_anonymize_batch_through_the_scaled_path(ray_server, replica_pids):
    requests = [_request(f"b{i}") for i in range(5)]
    bad = _request("b-bad")
    bad.params.skip = -1.0
    unnamed = _request("")
    replies = list(ray_server.stub.AnonymizeBatch(iter([*requests, bad, unnamed]), timeout=180))
    by_id = {reply.request_id: reply for reply in replies}
    assert len(replies) == 7
    for i in range(5):
        reply = by_id[f"b{i}"]
        assert reply.HasField("result"), reply.error
        assert _pid_of(reply.result.served_by) in replica_pids
    assert by_id["b-bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "skip" in by_id["b-bad"].error.message
    assert by_id[""].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "request_id" in by_id[""].error.message


def _video_requests(path: Path, chunk_bytes: int = 16 * 1024):
    data = path.read_bytes()
    start = pb2.VideoStart(request_id="v1", method=pb2.BLUR, filename=path.name, size_bytes=len(data))
    start.tracking.detect_every = 2
    yield pb2.AnonymizeVideoRequest(start=start)
    for offset in range(0, len(data), chunk_bytes):
        yield pb2.AnonymizeVideoRequest(chunk=pb2.VideoChunk(offset=offset, data=data[offset : offset + chunk_bytes]))


def _live_frames(clip: Path, count: int, window: int):
    import av

    with av.open(str(clip)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == count:
                return
            rgb = frame.to_ndarray(format="rgb24")
            message = pb2.FrameRequest(sequence=index, timestamp=index / 12, raw=pb2.RawFrame(rgb=rgb.tobytes()))
            message.raw.width, message.raw.height = rgb.shape[1], rgb.shape[0]
            if index == 0:
                message.options.method = pb2.PIXELATE
                message.options.window = window
                message.options.tracking.detect_every = 2
            yield message


def test_video_file_and_live_streams_are_each_served_by_one_replica(ray_server, tmp_path):
    """AnonymizeVideo and AnonymizeFrames behind Ray: a file round trip, and two live streams at once, each in
    order with its tracker's state kept (detect_every 2 alternates, track ids stay) on the replica it is pinned to."""
    import av

    from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip

    clip = tmp_path / "walk.mp4"
    make_clip(
        clip, ClipSpec(frames=12, fps=12, faces=(MovingFace(source=0, size=120, start=(20, 40), velocity=(6, 0)),))
    )

    def live(window: int) -> list[pb2.FrameResult]:
        return list(ray_server.stub.AnonymizeFrames(_live_frames(clip, 8, window), timeout=120))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(live, window) for window in (1, 3)]
        responses = list(ray_server.stub.AnonymizeVideo(_video_requests(clip), timeout=180))

    kinds = [response.WhichOneof("event") for response in responses]
    assert kinds[-1] == "report" and "output" in kinds, kinds
    output = b"".join(r.output.data for r in responses if r.HasField("output"))
    report = responses[-1].report
    assert report.frames == 12 and report.output_bytes == len(output) and report.tracks
    assert _pid_of(report.served_by) != ray_server.process.pid  # a replica did the work
    (tmp_path / "out.mp4").write_bytes(output)
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 12
    for future in streams:
        results = future.result()
        assert [r.sequence for r in results] == list(range(8))
        assert [r.detector_ran for r in results] == [True, False] * 4  # one stream's sampling state, in one place
        assert all(r.faces for r in results)
        # Each stream has its own tracker (ids start at 0 in both; one face, one id), and a frame between
        # detections is covered by the track the stream's earlier frames left on the same replica.
        assert [[face.track_id for face in r.faces] for r in results] == [[0]] * 8
        assert all(not face.detected for r in results if not r.detector_ran for face in r.faces)
        assert all(len(r.raw.rgb) == r.raw.width * r.raw.height * 3 > 0 for r in results)


def test_video_errors_come_from_the_replica_unchanged(ray_server, tmp_path):
    corrupt = tmp_path / "notes.mp4"
    corrupt.write_bytes(b"this is not a video\n" * 200)
    with pytest.raises(grpc.RpcError) as caught:
        list(ray_server.stub.AnonymizeVideo(_video_requests(corrupt), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "video" in caught.value.details()
    info = ray_server.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=30)
    too_wide = info.limits.max_frame_window + 1
    frames = iter([pb2.FrameRequest(options=pb2.FrameStreamOptions(window=too_wide), encoded=b"x")])
    with pytest.raises(grpc.RpcError) as caught:
        list(ray_server.stub.AnonymizeFrames(frames, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "window" in caught.value.details()


def test_a_cancelled_upload_leaves_no_file_on_the_replica(ray_server, tmp_path):
    import threading

    def spool_files() -> list[Path]:
        return [Path(folder) / name for folder, _, names in os.walk(ray_server.spool_dir) for name in names]

    clip = tmp_path / "noise.mp4"
    clip.write_bytes(np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    release = threading.Event()

    def stalling():
        requests = _video_requests(clip)
        for _ in range(4):  # start and three chunks, then the client stalls mid-upload
            yield next(requests)
        release.wait(60)

    call = ray_server.stub.AnonymizeVideo(stalling(), timeout=60)
    deadline = time.monotonic() + 30
    while not spool_files():
        assert time.monotonic() < deadline, "the upload never reached a replica's spool"
        time.sleep(0.05)
    call.cancel()
    release.set()
    deadline = time.monotonic() + 30
    while spool_files():
        assert time.monotonic() < deadline, f"left behind: {spool_files()}"
        time.sleep(0.1)


def test_killed_replica_fails_only_its_requests_and_comes_back(ray_server, replica_pids):
    assert len(replica_pids) == 2
    victim, survivor = sorted(replica_pids)
    progress: list[str] = []
    pool = concurrent.futures.ThreadPoolExecutor(8)
    futures = [pool.submit(ray_server.timed_stream, _request(f"k{i}", steps=100), progress, 150.0) for i in range(8)]
    deadline = time.monotonic() + 60
    while len(set(progress)) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(set(progress)) >= 6, f"the streams did not start: {sorted(set(progress))}"
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    done, not_done = concurrent.futures.wait(futures, timeout=170)
    pool.shutdown(wait=False, cancel_futures=True)
    assert not not_done, "a request hung after its replica was killed"
    outcomes = [f.result() for f in futures]
    unavailable = [o for o in outcomes if o[0] == "UNAVAILABLE"]
    succeeded = [o for o in outcomes if o[0] == "OK"]
    assert len(unavailable) + len(succeeded) == 8, outcomes
    assert unavailable, f"the killed replica had requests in flight; they must fail UNAVAILABLE: {outcomes}"
    assert all("retry" in details for _, details, _ in unavailable), unavailable
    # Whatever finished after the kill was served by the survivor; only the victim's requests failed.
    assert all(_pid_of(served_by) == survivor for _, served_by, at in succeeded if at > killed_at), outcomes
    assert any(at > killed_at for _, _, at in succeeded), f"the survivor's requests should finish: {outcomes}"

    # The next requests succeed at once (on the survivor while Serve replaces the dead replica) ...
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda i: ray_server.stream(_request(f"n{i}")), range(4)))
    assert all(status == "OK" for status, _ in after), after

    # ... and Serve starts a new replica, which then serves too.
    deadline = time.monotonic() + 180
    while ray_server.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=30).replicas < 2:
        assert time.monotonic() < deadline, f"the killed replica was not replaced:\n{ray_server.log_tail()}"
        time.sleep(1)
    # Serve routes each request to the less loaded of two replicas it samples: a replica that has
    # just started gets work once requests overlap, which a few rounds may not show (a CI run saw
    # 4 rounds of 6 all land on the survivor). Rounds go on for up to a minute.
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    round_ = 0
    while not seen - {victim, survivor} and time.monotonic() < deadline:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda i: ray_server.stream(_request(f"r{round_}-{i}")), range(8)))
        assert all(status == "OK" for status, _ in outcomes), outcomes
        seen |= {_pid_of(served_by) for _, served_by in outcomes}
        round_ += 1
    assert victim not in seen
    assert seen - {victim, survivor}, f"no request reached the replacement replica: {seen}"


def test_sigterm_stops_the_application_and_the_cluster(ray_server):
    processes = _descendants(ray_server.process.pid)
    assert len(processes) >= 4, "expected the Ray cluster's processes under the server"  # gcs, raylet, workers
    ray_server.process.send_signal(signal.SIGTERM)
    # The drain: the port stays open a few seconds, health says NOT_SERVING, new requests are refused.
    deadline = time.monotonic() + 2.5
    status = None
    while time.monotonic() < deadline:
        status = ray_server.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.05)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as refused:
        ray_server.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ray_server.process.wait(90) == 0, ray_server.log_tail()
    deadline = time.monotonic() + 30
    while _still_running(processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in _still_running(processes)}
    assert not left, f"Ray processes left behind: {left}"
