"""Tests for daft_core.models: building, preprocessing, weights from every source, safe checkpoint I/O."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from daft_core.models import (
    MODEL_REGISTRY,
    CheckpointError,
    DaftModel,
    build_model,
    checkpoint,
    count_batchnorm,
    load_model,
    load_state_dict_file,
    register_opener,
    save_model,
    uri_scheme,
)

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _uint8(n: int, c: int = 3, s: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def tiny() -> DaftModel:
    torch.manual_seed(0)
    return build_model("tiny_cnn", num_classes=3, input_size=16)


# --- architecture and preprocessing -----------------------------------------------------------------


def test_registry_names() -> None:
    for name in ("efficientnet_lite0", "resnet18", "resnet50", "moco_v2_resnet50", "timm", "tiny_cnn"):
        assert name in MODEL_REGISTRY
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no_such_model")


def test_preprocess_uint8_gray_8x8(tiny: DaftModel) -> None:
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = tiny.preprocess(x)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    expected = (1.0 - tiny.mean) / tiny.std  # white stays white through the resize
    torch.testing.assert_close(out, expected.expand(2, 3, 16, 16))
    assert tiny(_uint8(2, c=1, s=8)).shape == (2, 3)


def test_preprocess_float_at_input_size_is_not_resized(tiny: DaftModel) -> None:
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(tiny.preprocess(x), (x - tiny.mean) / tiny.std)
    torch.testing.assert_close(
        tiny.preprocess((x * 255).round().to(torch.uint8)), tiny.preprocess(x), atol=0.02, rtol=0
    )
    with pytest.raises(ValueError, match="1 or 3 channels"):
        tiny.preprocess(torch.zeros(1, 2, 16, 16))


def test_efficientnet_lite0_features_shape() -> None:
    m = build_model("efficientnet_lite0", num_classes=10, input_size=64).eval()
    x = _uint8(2, s=40)
    assert m.num_features == 1280
    assert m.features(x).shape == (2, 1280)
    assert m(x).shape == (2, 10)
    assert count_batchnorm(m) > 0
    assert m.spec["name"] == "efficientnet_lite0" and m.spec["input_size"] == 64


def test_efficientnet_lite0_imagenet_recognises_a_cat() -> None:
    from skimage import data

    m = build_model("efficientnet_lite0", weights="imagenet").eval()
    assert count_batchnorm(m) > 0
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1)  # (3, 300, 451) uint8
    h, w = img.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[:, top : top + side, left : left + side].unsqueeze(0)  # centre crop; the model resizes
    with torch.no_grad():
        probs = m(crop).softmax(dim=1)[0]
    top3 = probs.topk(3).indices.tolist()
    assert any(i in IMAGENET_CATS for i in top3), top3
    assert float(probs[list(IMAGENET_CATS)].sum()) > 0.5


def test_reset_and_replace_head(tiny: DaftModel) -> None:
    m = build_model("tiny_cnn", num_classes=4, input_size=16)
    m.reset_head("zero")
    assert not m.head.weight.any() and not m.head.bias.any()
    m.reset_head("random", generator=torch.Generator().manual_seed(1))
    w1 = m.head.weight.clone()
    bound = 1 / m.num_features**0.5
    assert w1.abs().max() <= bound and w1.abs().max() > bound / 4
    m.reset_head("random", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m.head.weight, w1)
    m.reset_head("random", generator=torch.Generator().manual_seed(2))
    assert not torch.equal(m.head.weight, w1)
    with pytest.raises(ValueError):
        m.reset_head("probe")  # type: ignore[arg-type]
    m.replace_head(7)
    assert m.head.out_features == 7 and m.spec["num_classes"] == 7 and m(_uint8(1)).shape == (1, 7)


# --- save / load ------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = build_model("tiny_cnn", num_classes=3, input_size=16, width=4)
    m.train()
    m(_uint8(8))  # move BN running stats away from their init
    m.eval()
    path = save_model(m, tmp_path / "sub" / "model.pt", extra={"stage": "pretrained", "acc": 0.5})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    loaded = load_model(path).eval()
    x = _uint8(4, c=1, s=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert loaded.spec["kwargs"] == {"width": 4}
    assert loaded.extra == {"stage": "pretrained", "acc": 0.5}
    with pytest.raises(TypeError):
        save_model(m, tmp_path / "bad.pt", extra={"obj": object()})


def test_save_load_timm_and_resnet(tmp_path: Path) -> None:
    for name in ("timm:resnet18", "resnet18"):
        m = build_model(name, num_classes=5, input_size=32).eval()
        assert count_batchnorm(m) > 0 and m.features(_uint8(2, s=32)).shape == (2, 512)
        loaded = load_model(save_model(m, tmp_path / f"{name.replace(':', '_')}.pt")).eval()
        x = _uint8(2, s=32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
        assert loaded.spec["name"] == name


def test_timm_without_batchnorm_is_rejected() -> None:
    with pytest.raises(ValueError, match="BatchNorm"):
        build_model("timm:vit_tiny_patch16_224", num_classes=2)


def test_load_model_rejects_non_daft_files(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(1)}, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="not a DaftModel checkpoint"):
        load_model(tmp_path / "raw.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "missing.pt")


# --- unsafe pickles ---------------------------------------------------------------------------------


class _ExecPayload:
    """Unpickling this runs code that writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_ExecPayload, _SystemPayload])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path, payload: type) -> None:
    # The payload really does run code under plain unpickling...
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_ExecPayload(probe)))
    assert probe.exists()
    # ...but not through our loaders.
    marker = tmp_path / "marker"
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "spec": {"name": "tiny_cnn"}, "x": payload(marker)}, bad)
    for load in (load_state_dict_file, load_model, lambda p: build_model("tiny_cnn", weights=p)):
        with pytest.raises(CheckpointError, match="refused"):
            load(bad)
    assert not marker.exists()


# --- weights from files -----------------------------------------------------------------------------


def test_wrong_architecture_lists_keys(tmp_path: Path) -> None:
    tiny_path = tmp_path / "tiny.pt"
    torch.save(build_model("tiny_cnn", num_classes=3).state_dict(), tiny_path)
    with pytest.raises(CheckpointError) as err:
        build_model("resnet18", weights=tiny_path, num_classes=3)
    msg = str(err.value)
    assert "missing keys" in msg and "conv1.weight" in msg
    assert "unexpected keys" in msg and "body.0.weight" in msg
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_model("tiny_cnn", weights=tiny_path, width=4)
    # a DaftModel checkpoint whose spec disagrees with its tensors
    ckpt = torch.load(save_model(build_model("tiny_cnn"), tmp_path / "m.pt"), weights_only=True)
    ckpt["spec"]["kwargs"] = {"depth": 3}
    torch.save(ckpt, tmp_path / "m3.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model(tmp_path / "m3.pt")


def _tv_resnet18() -> nn.Module:
    torch.manual_seed(123)
    return torchvision.models.resnet18(weights=None).eval()


def test_resnet18_local_weights_file(tmp_path: Path) -> None:
    ref = _tv_resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"model": ref.state_dict(), "epoch": 3}, path)
    m = build_model("resnet18", weights=path, input_size=32).eval()
    x = _uint8(2, s=32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(m.preprocess(x)))
    # a different number of classes keeps the backbone but not the 1000-way fc
    m10 = build_model("resnet18", weights=str(path), num_classes=10, input_size=32)
    torch.testing.assert_close(m10.backbone.conv1.weight, ref.conv1.weight)
    assert m10.head.out_features == 10


def test_moco_checkpoint_loads_backbone(tmp_path: Path) -> None:
    ref = _tv_resnet18()
    backbone_sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    sd = {f"module.encoder_q.{k}": v for k, v in backbone_sd.items()}
    sd |= {f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in backbone_sd.items()}
    sd |= {  # MoCo-v2's projection MLP replaces fc
        "module.encoder_q.fc.0.weight": torch.randn(512, 512),
        "module.encoder_q.fc.0.bias": torch.randn(512),
        "module.encoder_q.fc.2.weight": torch.randn(128, 512),
        "module.encoder_q.fc.2.bias": torch.randn(128),
        "module.queue": torch.randn(128, 16),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    path = tmp_path / "moco.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}}}, path)
    for fmt in ("auto", "moco"):
        m = build_model("resnet18", weights=path, num_classes=4, checkpoint_format=fmt)
        own = m.backbone.state_dict()
        assert set(own) == set(backbone_sd)
        for k, v in backbone_sd.items():
            assert torch.equal(own[k], v), k
    plain = tmp_path / "plain.pt"
    torch.save(backbone_sd, plain)
    with pytest.raises(CheckpointError, match="not a MoCo checkpoint"):
        build_model("resnet18", weights=plain, checkpoint_format="moco")


def test_torchvision_imagenet_needs_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="torch hub cache") as err:
        build_model("resnet18", weights="imagenet")
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(cached) in str(err.value)
    ref = _tv_resnet18()
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    m = build_model("resnet18", weights="imagenet")
    torch.testing.assert_close(m.head.weight, ref.fc.weight)


# --- URIs: the core reads local files only, other schemes go through a registered opener ---------------


@pytest.fixture
def no_s3_opener(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another test file may have run components.storage.install() in this process."""
    monkeypatch.delitem(checkpoint._OPENERS, "s3", raising=False)


@pytest.mark.usefixtures("no_s3_opener")
def test_s3_without_an_opener_says_how_to_enable_it(tiny: DaftModel) -> None:
    uri = "s3://models/runs/m.pt"
    for load in (load_state_dict_file, load_model, lambda p: build_model("tiny_cnn", weights=p)):
        with pytest.raises(CheckpointError) as err:
            load(uri)
        msg = str(err.value)
        assert uri in msg and "no opener" in msg and "components.storage.install()" in msg
    with pytest.raises(CheckpointError, match=r"register_opener\('gs', fetch\)"):
        load_model("gs://bucket/m.pt")


def test_registered_opener_feeds_the_safe_loader(
    tmp_path: Path, tiny: DaftModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    save_model(tiny, store / "m.pt", extra={"k": 1})
    torch.save(
        {"state_dict": {"w": torch.zeros(1)}, "x": _SystemPayload(tmp_path / "marker")}, store / "evil.pt"
    )
    fetched: list[str] = []

    def fetch(uri: str, dest: Path) -> None:
        fetched.append(uri)
        name = uri.split("://", 1)[1]
        if not (store / name).is_file():
            raise FileNotFoundError(f"no such object: {name}")
        dest.write_bytes((store / name).read_bytes())

    monkeypatch.setitem(checkpoint._OPENERS, "mem", fetch)
    register_opener("MEM://", fetch)  # scheme is normalised; registering again just replaces
    assert uri_scheme("mem://m.pt") == "mem" and uri_scheme(store / "m.pt") is None
    x = _uint8(2)
    loaded = load_model("mem://m.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tiny.eval()(x), rtol=0, atol=0)
    assert loaded.extra == {"k": 1} and fetched == ["mem://m.pt"]
    assert build_model("tiny_cnn", weights="mem://m.pt", num_classes=3, input_size=16).spec["weights"] == (
        "mem://m.pt"
    )
    with pytest.raises(CheckpointError, match=r"cannot fetch mem://missing.pt: no such object"):
        load_state_dict_file("mem://missing.pt")
    with pytest.raises(
        CheckpointError, match="refused"
    ):  # a fetched file gets no more trust than a local one
        load_state_dict_file("mem://evil.pt")
    assert not (tmp_path / "marker").exists()
    with pytest.raises(ValueError, match="not a URI scheme"):
        register_opener("no/slash", fetch)
