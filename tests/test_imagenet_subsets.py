"""ImageNet-1k teachers on an ImageNet subset (issue 25): a folder whose class folders are ImageNet wnids and teachers
with 1000 outputs keep the rows of the folder's classes (camkd/classmap.py), the same way in every path that runs a
teacher: cache-teachers (recorded per teacher in the store), cache-verify -t, distill --online.

The teachers are random-init torchvision resnet18s with 1000 classes saved as state_dicts (``tv:resnet18=FILE``);
the wnid list is timm's (``timm.data.ImageNetInfo``). Offline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from folder_helpers import make_folder

from camkd.checkpoint import load_checkpoint
from camkd.classmap import are_wnids, class_rows, imagenet_wnids, restrict_classes, subset_rows
from camkd.errors import CamkdError
from camkd.methods.camkd import camkd_kd_loss
from camkd.models import create_model
from camkd.models.tv import NAMES as TV_NAMES

timm = pytest.importorskip("timm")

WNIDS = ("n02102040", "n01440764", "n03000134")  # English springer, tench, chainlink fence: sorted as folders they reorder
SIZE = "32"


def test_rows_are_the_wnids_places_in_imagenet1k():
    names = list(timm.data.ImageNetInfo().label_names())
    assert class_rows(WNIDS) == [names.index(w) for w in WNIDS]
    assert class_rows(["n01440764"]) == [0]  # one class (K = 1 class): still a row
    assert imagenet_wnids()[999] == "n15075141"  # the last of the 1000 sorted wnids (toilet tissue)
    assert subset_rows(1000, sorted(WNIDS)) == sorted(names.index(w) for w in WNIDS)
    assert subset_rows(10, sorted(WNIDS)) is None  # not a 1000-class teacher: nothing to restrict
    assert subset_rows(1000, ("ant", "bee")) is None  # not an ImageNet subset
    assert subset_rows(1000, names) is None  # ImageNet-1k itself: the outputs are its classes already
    assert are_wnids(WNIDS) and not are_wnids(("n0144076",)) and not are_wnids(())


def test_a_wnid_that_is_not_in_imagenet1k_is_one_line():
    with pytest.raises(CamkdError, match=r"^class folder n99999999 is not among ImageNet-1k's 1000 classes, .*; keep only"):
        class_rows(["n01440764", "n99999999"])
    with pytest.raises(CamkdError, match=r"^2 class folders \(e.g. n99999998\) are not among"):
        class_rows(["n99999998", "n01440764", "n99999999"])


@pytest.mark.parametrize("arch", [*(f"tv:{n}" for n in TV_NAMES), "resnet8", "timm:resnet10t", "timm:convnext_atto"])
def test_restricted_logits_are_the_full_logits_columns(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=1000, in_channels=3).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        rows = [999, 0, 417]
        restrict_classes(model, rows)
        feats, out = model(x, is_feat=True)
        head = model.get_head()(feats[-2])
    assert model.num_classes == 3 and out.shape == (4, 3)
    torch.testing.assert_close(out, full[:, rows], rtol=1e-5, atol=1e-6)  # a GEMM over 3 rows: rounding may differ
    torch.testing.assert_close(head, out, rtol=0, atol=0)  # the head is the model's own (CA-MKD's feature term)


def _teacher(path, seed):
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return f"tv:resnet18={path}"


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """A 3-wnid folder, two 1000-class resnet18 teachers, a store of them (2 views, float32, every CA-MKD layer)."""
    from typer.testing import CliRunner

    from camkd.cli import app

    tmp = tmp_path_factory.mktemp("subset")
    root = make_folder(tmp / "data", classes=WNIDS)
    teachers = [_teacher(tmp / f"r18_{s}.pth", s) for s in (0, 1)]
    store = tmp / "store.zarr"
    r = CliRunner().invoke(app, ["cache-teachers", *[a for t in teachers for a in ("-t", t)], "--dataset", "imagefolder",
                                 "--data-dir", str(root), "--image-size", SIZE, "--workers", "0", "--views", "2",
                                 "--dtype", "float32", "--batch-size", "8", "--out", str(store)])
    assert r.exit_code == 0, r.output
    return {"root": root, "teachers": teachers, "store": store, "output": r.output}


def test_cache_records_and_stores_the_kept_rows(subset):
    from camkd.data import load_dataset
    from camkd.data.norm import normalize
    from camkd.store import open_store

    rows = class_rows(sorted(WNIDS))
    assert "restricted to the 3 classes of imagefolder" in subset["output"]
    st = open_store(subset["store"])
    d = st.description
    assert [t.class_rows for t in d.teachers] == [rows, rows] and [t.num_classes for t in d.teachers] == [3, 3]
    attrs = json.loads((subset["store"] / "zarr.json").read_text())["attributes"]
    assert json.dumps(rows) in json.dumps(attrs)  # plain zarr readers see the mapping too
    from camkd.store.info import teacher_line

    assert "1000 ImageNet-1k outputs restricted to the data's 3 classes" in teacher_line(0, d.teachers[0])
    # the stored logits are the full 1000-class teachers' columns of the kept rows, on the very views cached
    train = load_dataset("imagefolder", "train", data_dir=subset["root"], image_size=int(SIZE), workers=0)
    spec = train.aug_spec(0)
    batches = [np.arange(s, min(s + 8, len(train))) for s in range(0, len(train), 8)]
    nets = []
    for t in subset["teachers"]:
        net = torchvision.models.resnet18(weights=None)
        net.load_state_dict(torch.load(t.split("=", 1)[1], weights_only=True))
        nets.append(net.eval())
    stored = st.logits(0).float()
    labels = train.labels
    for idx, (x, _, _) in zip(batches, train.view_batches(spec, 0, batches, torch.device("cpu")), strict=True):
        with torch.no_grad():
            full = torch.stack([n(normalize(x, spec.norm)) for n in nets], dim=1)  # [B, 2, 1000]
        torch.testing.assert_close(stored[idx], full[:, :, rows], rtol=1e-5, atol=1e-6)
        # CA-MKD's confidence weights over the kept classes, by hand in float64 from the full logits' columns
        kept = full[:, :, rows].double()
        ce = -(kept.gather(2, labels[idx][:, None, None].expand(-1, 2, 1)).squeeze(2) - kept.logsumexp(2))
        hand = (1 - ce.exp() / ce.exp().sum(1, keepdim=True)) / (2 - 1)
        _, w = camkd_kd_loss(torch.zeros(len(idx), 3), stored[idx], labels[idx], T=4.0)
        torch.testing.assert_close(w.double(), hand, rtol=1e-5, atol=1e-6)
    # the stored heads predict the kept classes: each is the restricted head of its teacher
    from camkd.teachers import stored_heads

    for head, net in zip(stored_heads(st), nets, strict=True):
        torch.testing.assert_close(head.fc.weight, net.fc.weight[rows], rtol=0, atol=0)


def test_cache_verify_recomputes_with_the_stored_rows(subset, cli):
    r = cli("cache-verify", str(subset["store"]), *[a for t in subset["teachers"] for a in ("-t", t)],
            "--data-dir", str(subset["root"]))
    assert r.exit_code == 0, r.output
    assert "verdict: OK" in r.output and "over 48 (view, index) pairs" in r.output, r.output


def test_distill_from_the_store_equals_online(subset, tmp_path, cli):
    """Every CA-MKD term (the feature term from epoch 2) with the student held fixed (lr 0): the store's losses equal
    the live restricted teachers' (a wrong row, head or weight would differ by far more than rounding)."""
    common = ("--arch", "resnet8", "--method", "camkd", "--workers", "0", "--batch-size", "8", "--epochs", "2",
              "--lr", "0", "--seed", "1", "--device", "cpu", "-q")
    r = cli("distill", "--cache", str(subset["store"]), "--data-dir", str(subset["root"]), *common, "--out", str(tmp_path / "c"))
    assert r.exit_code == 0, r.output
    r = cli("distill", "--online", *[a for t in subset["teachers"] for a in ("-t", t)], "--dataset", "imagefolder",
            "--data-dir", str(subset["root"]), "--image-size", SIZE, *common, "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    rows = class_rows(sorted(WNIDS))
    for d in "co":  # each run records which outputs its teachers kept
        meta = load_checkpoint(tmp_path / d / "last.pth")["meta"]
        assert meta["teacher_weights"] == [{"weights": None, "class_rows": rows}] * 2
    cached, online = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "co")
    assert len(cached) == len(online) == 2
    for a, b in zip(cached, online, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_top1"] == b["test_top1"]


def test_a_teacher_of_other_classes_is_refused(subset, tmp_path, cli, one_error):
    torch.manual_seed(0)
    path = tmp_path / "r18_10.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    one_error(cli("cache-teachers", "-t", f"tv:resnet18={path}", "--dataset", "imagefolder", "--data-dir",
                  str(subset["root"]), "--image-size", SIZE, "--workers", "0", "--views", "1", "--out", str(tmp_path / "s.zarr")),
              r"has 10 classes but imagefolder has 3")
    assert not (tmp_path / "s.zarr").exists()


def test_evaluate_keeps_the_rows_of_a_1000_class_file(subset, cli):
    """evaluate ARCH=PATH of a 1000-class file on the wnid folder runs it as cache-teachers did: its top-1 is the one
    the store recorded for that teacher (the same images, size and evaluation)."""
    from camkd.store import open_store

    r = cli("evaluate", subset["teachers"][0], "--dataset", "imagefolder", "--data-dir", str(subset["root"]),
            "--image-size", SIZE, "--workers", "0", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert "restricted to the dataset's 3 ImageNet-1k classes" in out["which"]
    assert out["top1"] == pytest.approx(open_store(subset["store"]).description.teachers[0].test_accuracy, abs=1e-9)


def test_a_folder_not_all_wnids_says_which_is_not(subset, tmp_path, cli, one_error):
    root = make_folder(tmp_path / "data", classes=("cats", "n01440764", "n02102040"))
    one_error(cli("cache-teachers", "-t", subset["teachers"][0], "--dataset", "imagefolder", "--data-dir", str(root),
                  "--image-size", SIZE, "--workers", "0", "--views", "1", "--out", str(tmp_path / "s.zarr")),
              r"has 1000 classes but imagefolder has 3 \(a 1000-class ImageNet-1k teacher keeps a dataset's classes when "
              r"every class folder is an ImageNet wnid; cats is not\)")


def test_a_model_name_without_weights_is_one_line(subset, tmp_path, cli, one_error):
    for spec in ("timm:resnet18", "tv:resnet18"):
        one_error(cli("cache-teachers", "-t", spec, "--dataset", "imagefolder", "--data-dir", str(subset["root"]),
                      "--image-size", SIZE, "--workers", "0", "--views", "1", "--out", str(tmp_path / "s.zarr")),
                  rf"^error: {spec} names a model, not its weights: give published weights \(tv:NAME@WEIGHTS")
    file = subset["teachers"][0].split("=", 1)[1]
    one_error(cli("cache-teachers", "-t", f"timm:resnet18.a1_in1k={file}", "--dataset", "imagefolder", "--data-dir",
                  str(subset["root"]), "--image-size", SIZE, "--workers", "0", "--views", "1", "--out", str(tmp_path / "s.zarr")),
              rf"ARCH=FILE takes a model's name, and timm:resnet18.a1_in1k names published weights; write timm:resnet18={file}")


@pytest.mark.parametrize("method", ["aekd", "avg", "ebkd", "kd"])
def test_every_method_the_store_serves_distils_through_epoch_2(subset, tmp_path, cli, method):
    """The other methods from the restricted teachers' store (camkd: above; fitnet needs a hint layer, not stored),
    two epochs, and evaluate equals the run's own last metrics."""
    out = tmp_path / method
    r = cli("distill", "--cache", str(subset["store"]), "--data-dir", str(subset["root"]), "--arch", "resnet8",
            "--method", method, "--workers", "0", "--batch-size", "8", "--epochs", "2", "--device", "cpu", "-q",
            "--out", str(out))
    assert r.exit_code == 0, r.output
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 2
    e = cli("evaluate", str(out / "last.pth"), "--workers", "0", "--json")
    assert e.exit_code == 0, e.output
    assert json.loads(e.output)["top1"] == last["test_top1"]
