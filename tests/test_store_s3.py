"""Stores on object storage: a real S3 protocol (moto's server, on 127.0.0.1 only) through s3fs and
zarr's FsspecStore, dummy credentials from the environment.

cache-teachers -> cache-info -> cache-verify (with and without -t) on s3://; the S3 store equals
the same store written to disk object by object, each shard written by one PUT; a writer killed
with SIGKILL resumes to the same store; --repair after a deleted shard object; distillation from
s3:// (through the staged local copy of each view) gives the same weights as from disk.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("s3fs", reason="the S3 tests need the test extra: pip install -e '.[test]'")
moto_server = pytest.importorskip("moto.server", reason="the S3 tests need the test extra: pip install -e '.[test]'")

import boto3  # noqa: E402  (installed with moto)
from configs import distill_cfg  # noqa: E402

from camkd.checkpoint import load_checkpoint  # noqa: E402
from camkd.cli import app  # noqa: E402
from camkd.distill import distill  # noqa: E402
from camkd.errors import CamkdError  # noqa: E402
from camkd.job import Hooks  # noqa: E402
from camkd.models import create_model  # noqa: E402
from camkd.store import open_store  # noqa: E402
from camkd.store.location import parse_location, storage_options  # noqa: E402

BUCKET = "camkd-test"
KEY_ID, SECRET = "camkdtestkeyid", "camkd-test-secret-do-not-store"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1, a bucket, and the environment pointing s3fs at it (also for subprocesses)."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client
    server.stop()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[str]:
    """A seeded, untrained resnet8 saved as a reference checkpoint {'model': state_dict}, given as resnet8=PATH."""
    root = tmp_path_factory.mktemp("teachers")
    out = []
    for seed in (0,):
        torch.manual_seed(seed)
        path = root / f"t{seed}.pth"
        torch.save({"model": create_model("resnet8", num_classes=10, in_channels=3).state_dict()}, path)
        out.append(f"resnet8={path}")
    return out


UNITS = 3  # (view, block) units of the store below


def cache_args(teachers: list[str], out: str, views: int = 3) -> list[str]:
    """128 samples, penultimate + hint:1 float32 (~66 KB a row): one block of 128 rows per view, so 3 units of ~8 MB;
    hint1's chunks of 64 rows make it a sharded array (2 chunks a shard), the others one chunk a block."""
    args = ["cache-teachers"]
    for t in teachers:
        args += ["-t", t]
    return args + ["-d", "synthetic", "--limit", "128", "-V", str(views), "-f", "penultimate", "-f", "hint:1", "--dtype",
                   "float32", "--batch-size", "64", "--device", "cpu", "--no-eval", "-q", "--out", out]


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def s3_objects(client, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` by key relative to it."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1:]] = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    return out


def local_objects(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def local_store(teachers, tmp_path_factory) -> Path:
    """The reference: the same store written to local disk (in-process)."""
    path = tmp_path_factory.mktemp("local") / "s.zarr"
    r = invoke(*cache_args(teachers, str(path)))
    assert r.exit_code == 0, r.output
    return path


@pytest.fixture(scope="module")
def s3_store(s3, teachers, local_store):
    """The same store written to s3:// in-process, every S3 call of the write recorded (s3fs's own _call_s3)."""
    import s3fs

    calls: list[tuple[str, str]] = []
    real = s3fs.S3FileSystem._call_s3

    async def recording(self, method, *akw, **kw):
        name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
        calls.append((name, kw.get("Key", "")))
        return await real(self, method, *akw, **kw)

    url = f"s3://{BUCKET}/stores/a.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(s3fs.S3FileSystem, "_call_s3", recording)
        r = invoke(*cache_args(teachers, url))
    assert r.exit_code == 0, r.output
    return url, r.output, calls


# ---- location parsing ----------------------------------------------------------------------------

def test_parse_location(monkeypatch):
    loc = parse_location("s3://bucket/stores/x.zarr/")
    assert (loc.url, loc.protocol, loc.path, loc.is_local) == ("s3://bucket/stores/x.zarr", "s3", "bucket/stores/x.zarr", False)
    assert parse_location("gs://b/x.zarr").protocol == "gs"
    assert parse_location("file:///tmp/x.zarr").local_path == Path("/tmp/x.zarr")
    assert parse_location("cache/x.zarr").local_path == Path("cache/x.zarr") and str(parse_location("cache/x.zarr")) == "cache/x.zarr"
    assert parse_location(Path("rel/x.zarr")).is_local
    assert parse_location(Path("s3://b/x.zarr")).url == "s3://b/x.zarr"  # a URL that went through Path is mended
    with pytest.raises(CamkdError, match="credentials") as e:
        parse_location(f"s3://{KEY_ID}:{SECRET}@bucket/x.zarr")
    assert SECRET not in str(e.value) and KEY_ID not in str(e.value)
    with pytest.raises(CamkdError, match="bucket"):
        parse_location("s3://")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage_options("s3") == {"endpoint_url": "http://127.0.0.1:9"}
    assert storage_options("gs") == {}


# ---- write, inspect, verify ------------------------------------------------------------------------

def test_s3_store_equals_local_store_object_by_object(s3, s3_store, local_store):
    url, output, calls = s3_store
    remote, local = s3_objects(s3, "stores/a.zarr"), local_objects(local_store)
    assert remote.keys() == local.keys()
    for key in local:
        assert remote[key] == local[key], key
    # no credential or endpoint in any stored object (attrs included) or in the output
    for data in remote.values():
        assert SECRET.encode() not in data and KEY_ID.encode() not in data and b"127.0.0.1" not in data
    assert SECRET not in output
    # each shard of a (view, block) unit is written by exactly one PUT, never a multipart upload
    names = {name for name, _ in calls}
    assert not names & {"create_multipart_upload", "upload_part", "complete_multipart_upload"}, names
    shard_keys = [k for k in local if k.split("/")[0] in ("aug", "logits", "features") and "/c/" in k]
    puts = {k: sum(1 for name, key in calls if name == "put_object" and key == f"stores/a.zarr/{k}") for k in shard_keys}
    assert shard_keys and set(puts.values()) == {1}, puts
    gets = sum(1 for name, key in calls if name == "get_object" and key.removeprefix("stores/a.zarr/") in puts)
    print(f"{len(shard_keys)} shard objects: {sum(puts.values())} PUTs, {gets} GETs of a shard before its PUT "
          f"(zarr reads an existing shard first; absent on a new store); {len(calls)} S3 calls in all")


def test_cache_info_and_verify_on_s3(s3_store, teachers):
    url, _, _ = s3_store
    r = invoke("cache-info", url)
    assert r.exit_code == 0, r.output
    assert f"store      {url}" in r.output and f"complete   {UNITS}/{UNITS} blocks" in r.output, r.output
    r = invoke("cache-verify", url)
    assert r.exit_code == 0 and "verdict: OK" in r.output and "recomputation skipped" in r.output, r.output
    args = [x for t in teachers for x in ("-t", t)]
    r = invoke("cache-verify", url, *args, "--sample", "32", "--device", "cpu")
    assert r.exit_code == 0 and "verdict: OK" in r.output and "largest difference" in r.output, r.output
    # the plan of a remote store: no free-space refusal, said so; a dry run writes nothing
    other = f"s3://{BUCKET}/stores/dry.zarr"
    r = invoke(*cache_args(teachers, other), "--dry-run")
    assert r.exit_code == 0 and "free space at " + other + ": not checked (object storage)" in r.output, r.output
    assert not parse_location(other).exists()


def test_interrupted_creation_on_s3_is_created_anew(s3, teachers, local_store, interrupted_creation, one_error):
    """No rename on S3: a store stopped while being created keeps its CREATING mark; the same command starts it over."""
    url = f"s3://{BUCKET}/stores/half.zarr"
    assert invoke(*cache_args(teachers, url)).exit_code == 130
    interrupted_creation.restore()
    group = json.loads(s3.get_object(Bucket=BUCKET, Key="stores/half.zarr/zarr.json")["Body"].read())
    assert group["attributes"] == {"camkd_creating": True}
    r = invoke("cache-info", url)
    one_error(r, "not a camkd store")
    r = invoke(*cache_args(teachers, url))
    assert r.exit_code == 0, r.output
    assert s3_objects(s3, "stores/half.zarr") == local_objects(local_store)
    # --overwrite deletes every object under the prefix and writes the store again
    s3.put_object(Bucket=BUCKET, Key="stores/half.zarr/stray", Body=b"x")
    r = invoke(*cache_args(teachers, url), "--overwrite")
    assert r.exit_code == 0 and "cached 384 sample-views" in r.output, r.output
    assert s3_objects(s3, "stores/half.zarr") == local_objects(local_store)


# ---- kill -9 while writing to S3, resume, repair ---------------------------------------------------

def _flags(client, prefix: str) -> int:
    return client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/progress/c/").get("KeyCount", 0)


def test_sigkill_resume_and_repair_on_s3(s3, teachers, local_store):
    prefix = "stores/killed.zarr"
    url = f"s3://{BUCKET}/{prefix}"
    cmd = [sys.executable, "-m", "camkd.cli", *cache_args(teachers, url)]
    for attempt in range(3):  # noqa: B007 - reported below
        for key in s3_objects(s3, prefix):
            s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/{key}")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            if _flags(s3, prefix) > 0:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
        flagged = _flags(s3, prefix)
        if proc.returncode == -signal.SIGKILL and 0 < flagged < UNITS:
            break
    else:
        pytest.fail("could not kill cache-teachers while it was writing to S3")
    print(f"killed at attempt {attempt} with {flagged}/{UNITS} blocks flagged")
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr, resumed.stderr
    assert SECRET not in resumed.stderr + resumed.stdout
    reference = local_objects(local_store)
    assert s3_objects(s3, prefix) == reference

    # one shard object deleted: CORRUPT, --repair clears its block, the same command recomputes it
    victim = "features/hint1/t0/c/1/0/0/0/0"  # view 1's shard
    assert victim in reference
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/{victim}")
    r = invoke("cache-verify", url)
    assert r.exit_code == 1 and "CORRUPT" in r.output and "chunk file missing" in r.output, r.output
    r = invoke("cache-verify", url, "--repair")
    assert r.exit_code == 1 and "verdict: REPAIRED" in r.output, r.output
    r = invoke(*cache_args(teachers, url))
    assert r.exit_code == 0 and "cached 128 sample-views" in r.output, r.output
    assert s3_objects(s3, prefix) == reference
    assert invoke("cache-verify", url).exit_code == 0


# ---- distillation from S3: staged views, same weights ---------------------------------------------

def test_stager_copies_views_byte_for_byte(s3, s3_store, tmp_path):
    from camkd.store.stage import ViewStager

    url, _, _ = s3_store
    stager = ViewStager(open_store(url), tmp_path / "stage", layers=("penultimate",))
    folder = stager.folder
    staged = stager.store(1)
    remote = s3_objects(s3, "stores/a.zarr")
    keys = stager.view_keys(1)
    assert keys and all(k.split("/c/")[1].split("/")[0] == "1" for k in keys)
    assert not any(k.startswith("features/hint1/") for k in keys)  # only the layers asked for
    for key in keys:
        assert (folder / key).read_bytes() == remote[key], key
    assert not (folder / stager.view_keys(0)[0]).exists()
    assert torch.equal(staged.logits(1), open_store(url).logits(1))
    stager.evict(keep=set())
    assert not any((folder / k).exists() for k in keys)
    stager.close()
    assert not folder.exists()


def test_distill_from_s3_equals_local(s3_store, local_store, tmp_path, monkeypatch):
    url, _, _ = s3_store
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the staged copies go by default
    kw = dict(arch="resnet8", method="camkd", epochs=4, batch_size=32, lr=0.02, seed=1, deterministic=True, progress=False)
    a = distill(distill_cfg(cache=str(local_store), out=str(tmp_path / "local"), **kw))
    on_disk: dict[int, set] = {}  # epoch -> the views whose logits object is in the staging folder, seen at each step

    def look(epoch, losses):
        files = [p for p in tmp_path.glob("camkd-stage-*/logits/c/*/*/*/*") if p.is_file()]
        on_disk.setdefault(epoch, set()).add(tuple(sorted(int(p.relative_to(tmp_path).parts[3]) for p in files)))

    b = distill(distill_cfg(cache=url, out=str(tmp_path / "s3"), **kw), hooks=Hooks(on_step=look))
    # epoch e trains on view (e - 1) mod 3, read from its staged copy; the next view is staged meanwhile, no third
    assert sorted(on_disk) == [1, 2, 3, 4]
    for epoch, seen in on_disk.items():
        for views in seen:
            assert (epoch - 1) % 3 in views and set(views) <= {(epoch - 1) % 3, epoch % 3}, (epoch, seen)
    assert a["last_top1"] == b["last_top1"]
    wa, wb = load_checkpoint(tmp_path / "local" / "last.pth"), load_checkpoint(tmp_path / "s3" / "last.pth")
    for part in ("model", "method"):
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)
    gc.collect()
    assert not list(tmp_path.glob("camkd-stage-*")), "the staged copies were not deleted"


def test_ranks_of_one_machine_stage_each_view_once(s3_store, local_store, tmp_path):
    """torchrun, 2 ranks on this machine, from s3://: local rank 0 stages each view, rank 1 reads that copy.

    One staging folder ever exists (polled while the job runs), rank 1 copies nothing from S3, and the
    weights equal one process with 2 micro-batches reading the same store from local disk.
    """
    import threading

    url, _, _ = s3_store
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    worker = Path(__file__).parent / "workers" / "distill_staged.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp), PYTHONPATH=str(Path(__file__).parents[1]))
    seen: set[str] = set()
    done = threading.Event()

    def poll():
        while not done.is_set():
            seen.update(p.name for p in tmp.glob("camkd-stage-*"))
            time.sleep(0.01)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                            "--no-python", sys.executable, str(worker), url, str(tmp_path / "w2")],
                           env=env, capture_output=True, text=True, timeout=240)
    finally:
        done.set()
        watcher.join()
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(worker), str(local_store), str(tmp_path / "m2")], env={**env, "MICRO": "2"},
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"w2-rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["staged_bytes"] > 0 and ranks[1]["staged_bytes"] == 0, ranks
    assert len(seen) == 1, seen
    wa, wb = load_checkpoint(tmp_path / "w2" / "last.pth"), load_checkpoint(tmp_path / "m2" / "last.pth")
    for part in ("model", "method"):
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)
    assert not list(tmp.glob("camkd-stage-*")), "the staged copy was not deleted"


def test_staging_failure_on_local_rank_0_stops_both_ranks(s3, teachers, tmp_path):
    """A view object missing on S3: rank 0 (the stager) says which and how to repair, rank 1 stops too, no hang."""
    prefix = "stores/damaged.zarr"
    url = f"s3://{BUCKET}/{prefix}"
    r = invoke(*cache_args(teachers, url, views=1))
    assert r.exit_code == 0, r.output
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/logits/c/0/0/0/0")
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                        str(Path(sys.executable).parent / "camkd"), "distill", "-m", "resnet8", "-c", url, "--epochs", "1",
                        "--batch-size", "32", "--device", "cpu", "-q", "--out", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 2, r.stderr[-3000:]
    assert any("logits/c/0/0/0/0 of view 0 is missing" in e and "cache-verify" in e and "--repair" in e for e in errors), errors
    assert any("another rank failed while staging view 0" in e for e in errors), errors
    assert "Traceback" not in r.stderr.split("error: ")[0]
    assert not list(tmp_path.glob("camkd-stage-*")) and not (tmp_path / "run").exists()  # nothing left behind


def test_topk_store_on_s3_info_verify_distill(s3, teachers, tmp_path, monkeypatch):
    """A top-k store written to S3 reads, verifies and trains as the same store on local disk."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    url, local = f"s3://{BUCKET}/stores/topk.zarr", tmp_path / "topk.zarr"
    for out in (url, local):
        r = invoke(*cache_args(teachers, str(out), views=2), "--logits", "topk:3", "--kd-T", "4")
        assert r.exit_code == 0, r.output
    remote, here = s3_objects(s3, "stores/topk.zarr"), local_objects(local)
    assert remote.keys() == here.keys() and all(remote[k] == here[k] for k in here)
    r = invoke("cache-info", url)
    assert r.exit_code == 0 and "top-3 of 10 classes" in r.output and "tail mass  at T=4" in r.output, r.output
    r = invoke("cache-verify", url, *[x for t in teachers for x in ("-t", t)], "--sample", "16", "--device", "cpu")
    assert r.exit_code == 0 and "verdict: OK" in r.output and "topk/log_tail" in r.output, r.output
    kw = dict(arch="resnet8", method="camkd", epochs=2, batch_size=32, lr=0.02, seed=1, deterministic=True, progress=False)
    a = distill(distill_cfg(cache=str(local), out=str(tmp_path / "local"), **kw))
    b = distill(distill_cfg(cache=url, out=str(tmp_path / "s3"), **kw))
    assert a["last_top1"] == b["last_top1"]
    wa, wb = load_checkpoint(tmp_path / "local" / "last.pth"), load_checkpoint(tmp_path / "s3" / "last.pth")
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])


def test_missing_store_is_a_one_line_error(s3, one_error):
    r = invoke("cache-info", f"s3://{BUCKET}/nowhere.zarr")
    one_error(r, "not found")
