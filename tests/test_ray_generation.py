"""Generation on a real two-node Ray cluster (a head and a second ``ray start`` joining it, both on
loopback, CPU only): the set equals a single-process run byte for byte, a worker SIGKILLed in the
middle is replaced and its work redone, and a rerun keeps every finished image untouched.

The cluster is two ``ray start --block`` processes, each in a session of its own; the test finds
its own Ray workers among those sessions' processes and, at the end, ends both sessions (SIGTERM,
then SIGKILL) and checks that none of their processes is left. It never runs ``ray stop``, which
would stop every Ray process of this user on the machine, other people's included.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'diffss[ray]')")

from diffss.data import build_demo_dataset  # noqa: E402
from diffss.generation import (  # noqa: E402
    GenerationConfig,
    aux_relpath,
    build_tiny_diffusion,
    dataset_samples,
    generate_auxiliary,
)
from diffss.generation.ray_runner import _unit_done, plan_units  # noqa: E402
from diffss.generation.run import shard_samples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
PAINTER = b"ray::_Painter"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_ports() -> list[str]:
    """Every port a Ray node listens on, free now (defaults are fixed numbers another cluster on
    this machine may hold)."""
    p = free_ports(11)
    return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]), "--metrics-export-port", str(p[2]),
            "--dashboard-agent-listen-port", str(p[3]), "--dashboard-agent-grpc-port", str(p[4]),
            "--runtime-env-agent-port", str(p[5]), "--worker-port-list", ",".join(map(str, p[6:11]))]


def session_pids(sids: set[int]) -> list[tuple[int, bytes]]:
    """(pid, cmdline) of the processes in the sessions ``sids`` (ours, started below)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) in sids:
                found.append((int(entry.name), (entry / "cmdline").read_bytes()))
        except (OSError, ProcessLookupError):
            continue
    return found


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node, one CPU each, 80 MB object stores, no dashboard."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay short
    gcs, client = free_ports(2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
              "--object-store-memory", str(80 * 1024**2), "--temp-dir", str(temp), "--disable-usage-stats"]
    procs = []
    try:
        procs.append(subprocess.Popen([str(RAY), "start", "--head", "--port", str(gcs), "--ray-client-server-port",
                                       str(client), "--include-dashboard", "false", *common, *node_ports()],
                                      env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=open(temp / "head.err", "wb")))
        deadline = time.monotonic() + 90
        while True:  # the worker node joins once the head's GCS accepts connections
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", gcs)) == 0:
                    break
            assert procs[0].poll() is None, (temp / "head.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not start in 90 s"
            time.sleep(0.2)
        procs.append(subprocess.Popen([str(RAY), "start", "--address", f"127.0.0.1:{gcs}", *common, *node_ports()],
                                      env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=open(temp / "worker.err", "wb")))
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "sids": {p.pid for p in procs}}
    finally:
        sids = {p.pid for p in procs}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for sid in sids:
                with _quiet():
                    os.killpg(sid, sig)
            deadline = time.monotonic() + 5
            while session_pids(sids) and time.monotonic() < deadline:
                time.sleep(0.2)
        for p in procs:
            p.wait(timeout=10)
        left = session_pids(sids)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, ProcessLookupError)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo dataset (24 supports in fold 0's test split) and the tiny generator at batch 4."""
    base = tmp_path_factory.mktemp("world")
    build_demo_dataset(base / "demo", num_classes=8, per_class=6)
    tiny = build_tiny_diffusion(base / "tiny")
    config = GenerationConfig(**{**tiny.to_dict(), "batch_size": 4})
    config.to_json(base / "generation_config.json")
    samples, name = dataset_samples(dict(name="demo", root=base / "demo", fold=0, split="test"))
    return base, config, samples, name


def ray_generate(cluster, base: Path, out: Path) -> subprocess.Popen:
    """``diffss generate --ray ADDRESS`` as its own process (a driver joining the cluster)."""
    return subprocess.Popen(
        [sys.executable, "-m", "diffss.cli", "--quiet", "generate", "--dataset", "demo", "--root", str(base / "demo"),
         "--condition", "seg", "--num-aux", "2", "--output", str(out), "--conditions-dir", str(out / "conditions"),
         "--generation-config", str(base / "generation_config.json"), "--ray", cluster["address"],
         "--ray-workers", "2", "--ray-calls-per-unit", "1"],
        env=cluster["env"], cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> str:
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode()


def test_units_partition_the_supports_and_know_when_done(tmp_path, world):
    base, config, samples, name = world
    per_call = config.images_per_call(2)
    assert plan_units(24, 2, per_call, 1) == 12 and plan_units(24, 2, per_call, 4) == 3
    assert plan_units(3, 2, per_call, 1) == 2 and plan_units(0, 2, per_call, 1) == 0
    assert plan_units(24, 2, per_call, 100) == 1
    units = [shard_samples(samples, (u, 12)) for u in range(12)]
    keys = [(s.name, s.class_id) for unit in units for s in unit]
    assert len(keys) == len(set(keys)) == len(samples) == 24
    first = units[0]
    rows = {(str(s.name), int(s.class_id), k) for s in first for k in range(2)}
    assert not _unit_done(tmp_path, first, 2, rows)  # rows but no images
    for s in first:
        for k in range(2):
            path = tmp_path / aux_relpath(s.class_id, s.name, k)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"png")
    assert _unit_done(tmp_path, first, 2, rows)
    assert not _unit_done(tmp_path, first, 2, rows - {next(iter(rows))})  # a lost table row: redo


def test_cli_refuses_shard_with_ray(world):
    base, *_ = world
    proc = subprocess.run([sys.executable, "-m", "diffss.cli", "generate", "--dataset", "demo", "--root",
                           str(base / "demo"), "--generation-config", str(base / "generation_config.json"),
                           "--shard", "0/2", "--ray", "--output", str(base / "never")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--shard or --ray" in proc.stderr
    assert not (base / "never" / "demo" / "seg").exists() or not list((base / "never").rglob("*.png"))


def test_two_node_cluster_equals_single_process_despite_a_killed_worker(tmp_path, world, cluster):
    base, config, samples, name = world
    # The single-process run the cluster must match: same batch size, device, dtype and (one) thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = generate_auxiliary(samples, "seg", tmp_path / "whole", config, num_aux=2, dataset_name=name,
                                   conditions_dir=tmp_path / "whole" / "conditions", progress=False)
    finally:
        torch.set_num_threads(threads)
    ref = tmp_path / "whole" / name / "seg"

    out = tmp_path / "ray"
    root = out / name / "seg"
    driver = ray_generate(cluster, base, out)
    # SIGKILL one painter once the cluster has written its first images: mid-run.
    deadline, victim = time.monotonic() + 180, None
    while victim is None:
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no image appeared in 180 s"
        if root.is_dir() and any(root.rglob("*.png")):
            painters = [pid for pid, cmd in session_pids(cluster["sids"]) if cmd.startswith(PAINTER)]
            if painters:
                victim = painters[0]
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.02)
    painted_when_killed = len(list(root.rglob("*.png")))
    report = finish(driver)
    assert painted_when_killed < 48, "the run had finished before the kill; give it more work"
    numbers = re.search(r"(\d+) auxiliary images .* on Ray \((\d+) workers, (\d+) units, (\d+) nodes, (\d+) replaced\): "
                        r"(\d+) generated", report)
    assert numbers, report
    images, workers, units, nodes, replaced, generated = map(int, numbers.groups())
    assert (images, workers, units) == (48, 2, 12)
    # Images the killed worker had finished are kept by the unit's redo, not painted twice.
    assert 48 - painted_when_killed <= generated <= 48
    assert nodes == 2, report  # both nodes painted
    assert replaced >= 1, report  # the killed worker's replacement painted units
    assert victim not in [pid for pid, _ in session_pids(cluster["sids"])]

    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert files == sorted(p.relative_to(ref) for p in ref.rglob("*.png")) and len(files) == 48
    assert all((root / f).read_bytes() == (ref / f).read_bytes() for f in files)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no torn file left
    table = pd.read_parquet(root / "auxiliary.parquet")
    pd.testing.assert_frame_equal(table, whole)  # complete, one row per image, same values
    assert (root / "auxiliary.parquet").read_bytes() == (ref / "auxiliary.parquet").read_bytes()

    # Rerun after losing one image: only it is painted; every finished image stays untouched.
    lost = root / files[5]
    lost.unlink()
    before = {f: (root / f).stat().st_mtime_ns for f in files if f != files[5]}
    report = finish(ray_generate(cluster, base, out))
    assert re.search(r"\b1 generated, 47 kept", report), report
    assert {f: (root / f).stat().st_mtime_ns for f in before} == before
    assert lost.read_bytes() == (ref / files[5]).read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(root / "auxiliary.parquet"), whole)

    # Other settings on a finished folder are refused, as a single-process run refuses them.
    from diffss.generation.ray_runner import generate_on_ray

    other = GenerationConfig(**{**config.to_dict(), "guidance_scale": 3.0})
    with pytest.raises(ValueError, match="generation_config.json.*guidance_scale"):
        generate_on_ray(samples, "seg", out, other, num_aux=2, dataset_name=name, progress=False)


def test_dagster_paints_auxiliary_supports_on_ray_through_pipes(tmp_path):
    """generation_ray: the paint step of seg/auxiliary_supports launches the Ray driver as a Dagster
    Pipes subprocess (a local cluster of 2 workers); its progress lines reach the run's event log,
    its figures the asset's metadata, and the fan-in finds every image made."""
    import dagster as dg

    from diffss.experiment import FOLDS, ExperimentConfig, tiny_generation
    from orchestration.definitions import build_definitions

    settings = ExperimentConfig(data_root=str(tmp_path / "data"), demo_images_per_class=2, conditions=["seg"],
                                xshot_shots=[0, 1], generation=tiny_generation(), generation_ray="local",
                                generation_ray_workers=2)
    with pytest.raises(ValueError, match="generation_shards"):
        ExperimentConfig(**{**settings.to_dict(), "generation_shards": 2})
    defs = build_definitions(settings, executor="in_process")
    instance = dg.DagsterInstance.ephemeral()
    key = dg.AssetKey(["seg", "auxiliary_supports"])
    result = dg.materialize([*defs.assets], selection=dg.AssetSelection.assets(key).upstream(), instance=instance,
                            partition_key="demo_fold0", resources=defs.resources, raise_on_error=False)
    assert result.success, [e.event_specific_data for e in result.all_events if e.is_failure]
    meta = instance.get_latest_materialization_event(key).asset_materialization.metadata
    assert meta["ray_generated"].value == meta["images"].value > 0 and meta["ray_workers"].value == 2
    assert meta["generated"].value == 0  # the step's fan-in found every image made on Ray
    assert meta["ray_images_per_second"].value > 0
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    progress = [m for m in logs if re.search(r"\d+/\d+ images, [\d.]+ images/s", m)]
    assert progress and all(re.search(r"(\d+)/\1 images", m) for m in progress[-1:]), logs[-20:]
    fold = FOLDS["demo_fold0"]
    out = settings.folder(fold, "seg", "auxiliary_supports")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
