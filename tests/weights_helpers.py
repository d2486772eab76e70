"""Published weights offline, for the tests: torch.hub's downloads fail as with no network, and random-init
weights are placed where torchvision keeps a published file, under a name carrying the file's own sha256 prefix, with
torchvision's record of those weights pointed at that name (torchvision's record is changed, camkd's code is not)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torchvision

from camkd.checkpoint import sha256_file


def offline_torch_hub(tmp_path: Path, monkeypatch) -> list[str]:
    """A temporary TORCH_HOME (``tmp_path/torch``); a download attempt fails as with no network and records its URL
    in the list returned."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tried: list[str] = []

    def no_network(url, dst, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tried


def fake_published(tmp_path: Path, monkeypatch, weights, builder: str, *, seed: int = 0,
                   prefix: int = 8) -> tuple[dict[str, torch.Tensor], Path]:
    """torchvision's ``builder`` with random weights (seeded) saved in ``tmp_path/torch``'s torch.hub folder as the
    published ``weights`` (an enum member): (its state_dict, its file)."""
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = torchvision.models.get_model(builder, weights=None).state_dict()
    torch.save(state, folder / "tmp.pth")
    name = f"{builder}-{sha256_file(folder / 'tmp.pth')[:prefix]}.pth"
    (folder / "tmp.pth").rename(folder / name)
    monkeypatch.setattr(weights.value, "url", f"https://download.pytorch.org/models/{name}")
    return state, folder / name
