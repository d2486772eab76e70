"""The one decode + crop + resize path: torchvision's PIL geometry, RGB always, same bytes every call."""

import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from decode_helpers import load_eval, load_train_view, load_view, pixel_hash
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, PILToTensor, Resize

from camkd.data.decode import decoder_versions, pixel_hashes
from camkd.data.rrc import rrc_boxes


def natural(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    """Smooth blobs plus fine noise and a sharp edge: JPEG-like content, not pure noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "RGBA" if channels == 4 else "L"
    big = np.asarray(Image.fromarray(small.squeeze(-1) if channels == 1 else small, mode).resize((w, h), Image.Resampling.BICUBIC))
    noisy = big.astype(np.int16) + rng.integers(-10, 11, big.shape)
    noisy[: h // 3] = noisy[: h // 3] // 4  # a horizontal edge
    return noisy.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> path of each test image, plus the arrays written to the lossless PNGs."""
    d = tmp_path_factory.mktemp("images")
    rgb, rgba = natural(61, 83, 3, 0), natural(47, 90, 4, 1)
    images = {
        "rgb": (Image.fromarray(rgb), "rgb.jpg"),
        "rgb_png": (Image.fromarray(rgb), "rgb.png"),
        "gray": (Image.fromarray(natural(70, 50, 1, 2)), "gray.jpg"),
        "gray_png": (Image.fromarray(natural(33, 40, 1, 3)), "gray.png"),
        "rgba": (Image.fromarray(rgba, "RGBA"), "rgba.png"),
        "rgba_colours": (Image.fromarray(rgba[..., :3]), "rgba_colours.png"),
        "cmyk": (Image.fromarray(rgb).convert("CMYK"), "cmyk.jpg"),
        "disguised": (Image.fromarray(rgb), "disguised.JPEG"),  # ImageNet has a PNG named .JPEG
    }
    out = {"rgb_array": rgb}
    for name, (img, file) in images.items():
        img.save(d / file, format="PNG" if name == "disguised" else None, **({"quality": 90} if file.endswith(".jpg") else {}))
        out[name] = d / file
    return out


IMAGES = ["rgb", "rgb_png", "gray", "gray_png", "rgba", "cmyk", "disguised"]


def pil_rgb(path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@pytest.mark.parametrize("name", IMAGES)
def test_every_mode_gives_rgb_uint8_views(files, name):
    path = files[name]
    view, box, flip = load_train_view(path, seed=0, view=0, index=5, size=24)
    assert view.shape == (3, 24, 24) and view.dtype == torch.uint8 and view.is_contiguous()
    w, h = Image.open(path).size
    boxes, flips = rrc_boxes(0, 0, np.array([5]), h, w)
    assert np.array_equal(box, boxes[0]) and flip == flips[0]
    assert torch.equal(view, load_view(path, box, flip, 24))
    assert load_eval(path, 24).shape == (3, 24, 24)
    if name.startswith("gray"):
        assert torch.equal(view[0], view[1]) and torch.equal(view[0], view[2])


@pytest.mark.parametrize("flip", [0, 1])
def test_crop_without_resize_is_the_written_pixels(files, flip):
    """A size x size box needs no resampling: the view must be exactly those pixels of the array the test
    wrote to the lossless PNG (independent of any decoder), mirrored when flipped."""
    top, left, size = 9, 20, 30
    view = load_view(files["rgb_png"], (top, left, size, size), flip, size)
    expect = files["rgb_array"][top : top + size, left : left + size]
    expect = expect[:, ::-1] if flip else expect
    assert np.array_equal(view.permute(1, 2, 0).numpy(), expect)


def test_rgba_drops_alpha(files):
    """RGBA -> RGB as torchvision's ImageFolder loader: the colour channels as written, alpha ignored."""
    view = load_view(files["rgba"], (0, 0, 47, 90), 0, 47)  # a non-square box resized to 47x47
    assert torch.equal(view, load_view(files["rgba_colours"], (0, 0, 47, 90), 0, 47))


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("flip", [0, 1])
def test_view_is_torchvisions_resized_crop_then_flip(files, name, flip):
    """Against torchvision's functional RandomResizedCrop + RandomHorizontalFlip path on the PIL image
    (resized_crop, bilinear, then hflip): the same Pillow calls, so equal bytes are required."""
    path = files[name]
    img = pil_rgb(path)
    for box in rrc_boxes(3, 1, np.arange(8), img.height, img.width)[0]:
        ref = TF.resized_crop(img, *(int(v) for v in box), [32, 32], TF.InterpolationMode.BILINEAR)
        ref = TF.pil_to_tensor(TF.hflip(ref) if flip else ref)
        assert torch.equal(load_view(path, box, flip, 32), ref)


def test_view_matches_torchs_own_resize(files):
    """An independent resampler (torch's uint8 antialiased bilinear on the written array) reads the box
    the same way. The two bilinear implementations differ by rounding only (measured: at most 1 level,
    mean <= 0.21, with torch's default, AVX2 and AVX512 kernels); a box one pixel off or a missed flip
    differs by a mean of 3.5 levels or more, so the bounds below tell them apart."""
    decoded = torch.from_numpy(files["rgb_array"]).permute(2, 0, 1)

    def mean_max(view: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
        diff = (view.int() - ref.int()).abs()
        return float(diff.float().mean()), int(diff.max())

    for k, box in enumerate(rrc_boxes(0, 0, np.arange(12), 61, 83)[0]):
        top, left, h, w = (int(v) for v in box)
        flip = k % 2
        ref = TF.resized_crop(decoded, top, left, h, w, [40, 40], antialias=True)
        ref = ref.flip(-1) if flip else ref
        mean, most = mean_max(load_view(files["rgb_png"], box, flip, 40), ref)
        assert most <= 2 and mean < 0.5, (box, mean, most)
        assert mean_max(load_view(files["rgb_png"], box, 1 - flip, 40), ref)[0] > 1.0
        off = (top + 1, left, h, w) if top + h < 61 else (top, left, h - 1, w)
        assert mean_max(load_view(files["rgb_png"], off, flip, 40), ref)[0] > 1.0


@pytest.mark.parametrize("name", ["rgb", "gray", "rgba", "cmyk"])
@pytest.mark.parametrize("size", [16, 37])
def test_eval_is_torchvisions_resize_center_crop(files, name, size):
    path = files[name]
    ref = Compose([Resize(round(size / 0.875)), CenterCrop(size), PILToTensor()])(pil_rgb(path))
    assert torch.equal(load_eval(path, size), ref)


def test_deterministic_and_bytes_equal_path(files):
    path = files["rgb"]
    box = (3, 5, 40, 50)
    first = load_view(path, box, 1, 28)
    assert torch.equal(first, load_view(path, box, 1, 28))
    assert torch.equal(first, load_view(path.read_bytes(), box, 1, 28))
    assert torch.equal(load_eval(path, 20), load_eval(str(path), 20))


@pytest.mark.parametrize("box", [(-1, 0, 5, 5), (0, 0, 62, 10), (0, 80, 5, 4), (0, 0, 0, 5)])
def test_box_outside_the_image_is_refused(files, box):
    with pytest.raises(ValueError, match="not inside the 61x83 image"):
        load_view(files["rgb"], box, 0, 8)


def test_pixel_hashes(files):
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, (5, 3, 24, 24), dtype=np.uint8))
    hashes = pixel_hashes(batch)
    assert hashes.dtype == np.uint32 and hashes.shape == (5,)
    assert hashes.tolist() == [pixel_hash(v) for v in batch] == [zlib.crc32(v.numpy().tobytes()) for v in batch]
    assert np.array_equal(pixel_hashes(batch.numpy()), hashes)
    assert np.array_equal(pixel_hashes(batch.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)), hashes)  # C order
    changed = batch.clone()
    changed[2, 1, 7, 9] ^= 1
    assert (pixel_hashes(changed) != hashes).tolist() == [False, False, True, False, False]
    assert pixel_hash(load_view(files["rgb"], (0, 0, 61, 83), 0, 16)) == pixel_hash(load_view(files["rgb"], (0, 0, 61, 83), 0, 16))
    with pytest.raises(ValueError, match="uint8"):
        pixel_hash(batch[0].float())


def test_decoder_versions():
    v = decoder_versions()
    assert v["pillow"] == Image.__version__ and v["decoder"]
    assert all(isinstance(x, str | None) for x in v.values())
