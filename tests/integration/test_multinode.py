"""Multi-node on one machine: a Ray head and a second node, each started with ``ray start --block`` as a
process of its own (its own raylet, object store and resources), the pretrain job submitted to them
with ``recflm submit``, and checks that DDP ran with one worker on each node and that the checkpoints
and the bundle landed in the shared storage path (one file system here, as NFS would be on a cluster).

The nodes use free ports and short temp dirs of their own, and are stopped by their process ids when
the test ends, whatever happens (SIGTERM to each ``ray start``, then SIGKILL to what is left of the
session it leads): never ``ray stop``, which would stop every Ray on the machine.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's `ray` and `recflm`
pytestmark = [pytest.mark.integration, pytest.mark.slow]


_TAKEN: set[int] = set()


def _free_port() -> int:
    """A free port no earlier call of this test returned: the kernel hands a just-closed port out again,
    and two components of one node on the same port make `ray start` fail."""
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def _node_ports() -> list[str]:
    """Every port a node would otherwise take from a fixed default (52365, 8076, ...), chosen free."""
    args = []
    for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"):
        args += [flag, str(_free_port())]
    return args


def _session_pids(sid: int) -> list[int]:
    """The processes of the session a node's `ray start` leads (start_new_session=True makes it the
    leader): the raylet, GCS, agents and every worker it forked, whatever process group they moved to."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _stop(proc: subprocess.Popen) -> list[int]:
    """SIGTERM to `ray start --block` stops the node; then SIGKILL what is left of the session it leads.
    Returns the pids still there after that (none, normally)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(timeout=10)
    t0 = time.time()
    while _session_pids(proc.pid) and time.time() - t0 < 10:
        time.sleep(0.2)
    return _session_pids(proc.pid)


# guards against a hang, not speed checks: on a loaded machine (load 40 on 2 cores seen) starting a node takes
# minutes and the 12-step job many more
NODE_START_S = 300
JOB_S = 1200


def _wait_for(what: str, check, procs, timeout: float):
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{' '.join(p.args[:3])} exited with {p.returncode} while waiting for {what}")
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # not up yet: connection refused, dashboard module still starting, ...
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head (2 CPUs, the dashboard / job server) and a second node (2 CPUs) on this machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # as from an activated venv: the job's `python` is the venv's; no draining on SIGTERM (a test cluster)
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", OMP_NUM_THREADS="1",
               RAY_DATA_DEFAULT_SHUFFLE_STRATEGY="hash_shuffle", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    temp = f"/tmp/rmn{uuid.uuid4().hex[:6]}"  # short: Ray puts unix sockets under it (the head's; node 2: ...n2)
    gcs, dash = _free_port(), _free_port()
    # Ray's processes that look their cluster up (Train's placement-group cleaner uses the State API)
    # find this one, not another Ray on the machine (the test session's own, say)
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
              "--object-store-memory", str(256 * 2**20), "--disable-usage-stats"]
    procs = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as out:
            p = subprocess.Popen([str(BIN / "ray"), "start", *args, *common, *_node_ports()], env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    url = f"http://127.0.0.1:{dash}"
    try:
        start(["--head", "--port", str(gcs), "--dashboard-port", str(dash), "--include-dashboard", "true",
               "--ray-client-server-port", str(_free_port()), "--temp-dir", temp], "head.log")
        _wait_for("the head's dashboard", lambda: urllib.request.urlopen(f"{url}/api/version", timeout=2).read(),
                  procs, NODE_START_S)
        # its own temp dir: nodes on one machine must not share runtime_resources/ (each node's agent
        # unpacks and garbage-collects the job's working_dir there)
        start(["--address", f"127.0.0.1:{gcs}", "--temp-dir", temp + "n2"], "node2.log")

        from ray.util.state import list_nodes

        def alive():
            nodes = list_nodes(address=url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
            return nodes if len(nodes) == 2 else None

        nodes = _wait_for("two alive nodes", alive, procs, NODE_START_S)
        yield {"address": url, "node_ids": sorted(n.node_id for n in nodes), "procs": procs}
    finally:
        # the second node first, then the head; nothing they started may outlive the test (a CLI run
        # elsewhere on the machine would attach to a Ray it finds running)
        left = [pid for p in reversed(procs) for pid in _stop(p)]
        assert not left, f"processes of the nodes still run: {left}"
        for d in (temp, temp + "n2"):
            shutil.rmtree(d, ignore_errors=True)


def test_pretrain_job_runs_ddp_across_two_nodes(two_node_cluster, bundled_dataset, tmp_path):
    data, _, _ = bundled_dataset
    shared = tmp_path / "shared"  # the storage every node sees
    submission_id = f"recflm-multinode-{uuid.uuid4().hex[:8]}"
    cmd = [str(BIN / "recflm"), "submit", "pretrain", "--address", two_node_cluster["address"],
           "--working-dir", str(ROOT), "--submission-id", submission_id,
           # fewer Ray Data shuffle actors (default 2 per cluster CPU): each is a process to start on 2 cores
           "--env", "RAY_DATA_MAX_HASH_SHUFFLE_AGGREGATORS=2",
           f"data={data}", f"out={shared}/bundle", "name=mn", f"storage_path={shared}/runs", "preset=tiny",
           "workers=2", "cpus_per_worker=1", "placement_strategy=STRICT_SPREAD", "epochs=1", "batch_size=8",
           "vocab_size=600", "max_steps=12", "log_every=4", "checkpoint_every=4", "val_examples=16",
           "val_users=5", "val_beams=10", "shuffle_buffer=100", "families=[sequential,direct]"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"recflm submit did not finish in {e.timeout} s; its output:\n{(e.stdout or b'').decode()[-6000:]}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert f"submitted {submission_id}" in out and f"job {submission_id} SUCCEEDED" in out, out[-4000:]
    assert "[recflm] step 12/" in out  # the job's logs were followed to the end

    # DDP ran with two workers, one on each node of the cluster
    history = json.loads((shared / "runs" / "mn" / "metrics.json").read_text())
    final = history[-1]
    assert final["world_size"] == 2 and final["step"] == 12
    assert sorted(final["worker_nodes"]) == two_node_cluster["node_ids"]
    manifest = json.loads((shared / "bundle" / "manifest.json").read_text())
    assert sorted(manifest["metrics"]["worker_nodes"]) == two_node_cluster["node_ids"]

    # checkpoints in the shared storage path: Ray Train's checkpoint dirs with the model and train state
    ckpts = sorted(p for p in (shared / "runs" / "mn").glob("checkpoint_*") if p.is_dir())
    assert ckpts, sorted(p.name for p in (shared / "runs" / "mn").iterdir())
    for c in ckpts:
        assert (c / "model.safetensors").stat().st_size > 0 and (c / "train_state.pt").is_file()
    assert json.loads((ckpts[-1] / "history.json").read_text())[-1]["step"] == 12
    assert (shared / "bundle" / "model.safetensors").is_file()


    # a job that fails makes `recflm submit` fail, with the job's error in the output it followed
    bad = subprocess.run([str(BIN / "recflm"), "submit", "pretrain", "--address", two_node_cluster["address"],
                          "--working-dir", str(ROOT), f"data={tmp_path}/no_such_data"],
                         env=env, capture_output=True, text=True, timeout=JOB_S)
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "FAILED" in bad.stdout and "no_such_data" in bad.stdout
