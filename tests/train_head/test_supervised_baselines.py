"""The paper's supervised baselines (`fcn8-vgg16`, `unet-resnet18`): shapes, gradients, and torchvision weights.

No torchvision here (it cannot be imported next to the project's torch), so the torchvision files are written by
the tests from the published layouts, with random values; the FCN is built once per module, since its fc6 and
fc7 alone hold 120M parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import FlexibleUNet
from pathseg.train_head.fcn8_vgg16 import FCN8VGG16Head, VGG16Features
from pathseg.train_head.unet_resnet18 import UNetResNet18Head
from torch.nn import functional as F

from pathseg.errors import PathsegError

K = 3
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16"}
VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU two threads spin-waiting on each other made a
    32-pixel U-Net step take 2 s of CPU instead of 0.05 s (as in tests/pretrain/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fcn(one_thread) -> FCN8VGG16Head:
    return FCN8VGG16Head(K)


@pytest.fixture
def fcn_to_load(fcn):
    """The shared FCN, initialised afresh afterwards (the files' N(0, 1) weights would overflow in a forward) in
    place: a copy of its 540 MB to put back costs seconds of page faults on this machine."""
    yield fcn
    for module in [*fcn.fcn.vgg.modules(), fcn.fcn.fc6, fcn.fcn.fc7]:
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()


def _random(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Random values that cost what their longest side costs: every element is `base[sum of its indices]`, so a
    4096 x 25088 matrix is saved by torch.save as 29k floats, yet any misplaced element still shows."""
    base = torch.randn(sum(shape) - len(shape) + 1, generator=generator).to(dtype)
    return base.as_strided(shape, (1,) * len(shape))


def torchvision_vgg16_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for index, cin, cout in VGG16_CONVS:
        shapes |= {f"features.{index}.weight": (cout, cin, 3, 3), f"features.{index}.bias": (cout,)}
    for index, cin, cout in ((0, 25088, 4096), (3, 4096, 4096), (6, 4096, 1000)):
        shapes |= {f"classifier.{index}.weight": (cout, cin), f"classifier.{index}.bias": (cout,)}
    return shapes


def torchvision_resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """resnet18-f37072fd.pth's keys and shapes (no `num_batches_tracked`: the file predates it)."""
    def bn(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.{kind}": (n,) for kind in ("weight", "bias", "running_mean", "running_var")}

    shapes = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    cin = 64
    for layer, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            shapes |= {f"{p}.conv1.weight": (width, cin, 3, 3), **bn(f"{p}.bn1", width),
                       f"{p}.conv2.weight": (width, width, 3, 3), **bn(f"{p}.bn2", width)}
            if cin != width:
                shapes |= {f"{p}.downsample.0.weight": (width, cin, 1, 1), **bn(f"{p}.downsample.1", width)}
            cin = width
    return shapes | {"fc.weight": (1000, 512), "fc.bias": (1000,)}


def random_state(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {key: _random(shape, generator, dtype) for key, shape in shapes.items()}


def save_safetensors(state: dict[str, torch.Tensor], path: Path, holes_above: int | None = None) -> None:
    """The safetensors layout (u64 header size, JSON header, raw little-endian bytes), written straight from the
    tensors. Matrices over `holes_above` elements get their first and last rows only, the rest left as a hole
    that reads back as zeros: this disk writes ~150 MB/s and VGG's classifier matrices alone are 480 MB."""
    header, offset = {}, 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as file:
        file.write(len(text).to_bytes(8, "little") + text)
        start = file.tell()
        for key, tensor in state.items():
            file.seek(start + header[key]["data_offsets"][0])
            if holes_above is None or tensor.dim() != 2 or tensor.numel() <= holes_above:
                file.write(memoryview(tensor.contiguous().numpy()).cast("B"))
                continue
            row_bytes = tensor.shape[1] * tensor.element_size()
            for row in (0, tensor.shape[0] - 1):
                file.seek(start + header[key]["data_offsets"][0] + row * row_bytes)
                file.write(memoryview(tensor[row].contiguous().numpy()).cast("B"))
        file.truncate(start + offset)


def image(batch: int, size: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1


def test_vgg16_features_are_torchvisions_layout():
    features = VGG16Features()
    expected = [f"features.{index}.{kind}" for index, _, _ in VGG16_CONVS for kind in ("weight", "bias")]
    assert list(features.state_dict()) == expected
    assert sum(p.numel() for p in features.parameters()) == 14_714_688
    assert {k: tuple(v.shape) for k, v in features.state_dict().items()} == {
        k: v for k, v in torchvision_vgg16_shapes().items() if k.startswith("features.")}


def test_torchvision_vgg16_loads_into_features_fc6_and_fc7(fcn_to_load, tmp_path):
    state = random_state(torchvision_vgg16_shapes())
    torch.save(state, tmp_path / "vgg16.pth")
    fcn_to_load.load_vgg16(tmp_path / "vgg16.pth")
    loaded = fcn_to_load.fcn.state_dict()
    for index, _, _ in VGG16_CONVS:
        for kind in ("weight", "bias"):
            assert torch.equal(loaded[f"vgg.features.{index}.{kind}"], state[f"features.{index}.{kind}"])
    assert torch.equal(loaded["fc6.weight"], state["classifier.0.weight"].reshape(4096, 512, 7, 7))
    assert torch.equal(loaded["fc7.weight"], state["classifier.3.weight"][:, :, None, None])
    assert torch.equal(loaded["fc6.bias"], state["classifier.0.bias"])
    assert torch.equal(loaded["fc7.bias"], state["classifier.3.bias"])
    assert loaded["score_fr.weight"].shape == (K, 4096, 1, 1)  # classifier.6 (1000 ImageNet classes) dropped


def test_torchvision_vgg16_loads_from_half_precision_safetensors(fcn_to_load, tmp_path):
    """In float16, as such files are often shared, and because reading 550 MB in takes this machine seconds."""
    state = random_state(torchvision_vgg16_shapes(), torch.float16)
    save_safetensors(state, tmp_path / "vgg16.safetensors", holes_above=10**6)
    fcn_to_load.load_vgg16(tmp_path / "vgg16.safetensors")
    loaded = fcn_to_load.fcn.state_dict()
    for index, _, _ in VGG16_CONVS:
        for kind in ("weight", "bias"):
            assert torch.equal(loaded[f"vgg.features.{index}.{kind}"], state[f"features.{index}.{kind}"].float())
    for key, layer in (("classifier.0", "fc6"), ("classifier.3", "fc7")):
        weight = loaded[f"{layer}.weight"].flatten(1)
        assert torch.equal(weight[[0, -1]], state[f"{key}.weight"][[0, -1]].float())  # the rows the file holds
        assert not weight[1:-1].any()  # the hole between them, which reads back as zeros
        assert torch.equal(loaded[f"{layer}.bias"], state[f"{key}.bias"].float())


def test_a_wrong_vgg16_file_fails_in_one_line_and_leaves_the_head_alone(fcn, tmp_path):
    before = fcn.fcn.vgg.features[0].weight.clone()
    state = random_state(torchvision_vgg16_shapes())
    misshaped = tmp_path / "misshaped.pth"
    torch.save(state | {"classifier.3.weight": torch.zeros(4096, 2048)}, misshaped)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "features.28.bias"}, missing)
    for path, problem in ((misshaped, "mis-shaped keys: classifier.3.weight"), (missing, "missing keys: features.28")):
        with pytest.raises(PathsegError, match=problem) as error:
            fcn.load_vgg16(path)
        assert "\n" not in str(error.value) and str(path) in str(error.value) and "vgg16" in str(error.value)
    with pytest.raises(PathsegError, match="does not exist"):
        fcn.load_vgg16(tmp_path / "absent.pth")
    assert torch.equal(fcn.fcn.vgg.features[0].weight, before)


def test_unet_encoder_keys_are_torchvisions_resnet18_and_counts():
    head = UNetResNet18Head(2)
    expected = {k for k in torchvision_resnet18_shapes() if not k.startswith("fc.")}
    keys = set(head.unet.encoder.state_dict())
    assert {k for k in keys if not k.endswith("num_batches_tracked")} == expected
    count = sum(p.numel() for p in head.parameters())
    stock = FlexibleUNet(in_channels=3, out_channels=2, backbone="resnet18", pretrained=False, spatial_dims=2)
    print(f"UNetResNet18Head(2): {count:,} parameters; MONAI's stock FlexibleUNet: "
          f"{sum(p.numel() for p in stock.parameters()):,}")
    # MONAI's own ~13.5M, plus torchvision's three projection shortcuts (1x1 conv + BatchNorm)
    assert sum(p.numel() for p in stock.parameters()) == 13_545_730
    assert count == 13_545_730 + sum(w * c + 2 * w for c, w in ((64, 128), (128, 256), (256, 512))) == 13_719_554
    assert abs(count - 13.5e6) < 0.25e6


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_resnet18_loads_into_the_encoder(tmp_path, suffix):
    state = random_state(torchvision_resnet18_shapes())
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_safetensors(state, path)
    head = UNetResNet18Head(2, path)
    loaded = head.unet.encoder.state_dict()
    for key, tensor in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], tensor), key


def test_the_encoder_computes_torchvisions_resnet18():
    """With torchvision's keys, the encoder must also be torchvision's network, or ImageNet weights would load
    into a different function: this is torchvision's ResNet18 forward, written out from its source."""
    encoder = UNetResNet18Head(2).unet.encoder.eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # BatchNorm as trained weights have it, not the identity it starts as
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    w = encoder.state_dict()

    def bn(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(x, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"], w[f"{p}.bias"])

    pixels = torch.randn(1, 3, 64, 64, generator=generator)
    expected = [F.relu(bn(F.conv2d(pixels, w["conv1.weight"], stride=2, padding=3), "bn1"))]
    x = F.max_pool2d(expected[0], 3, 2, 1)
    for layer in range(1, 5):
        for block in range(2):
            p, stride = f"layer{layer}.{block}", 2 if layer > 1 and block == 0 else 1
            out = F.relu(bn(F.conv2d(x, w[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            out = bn(F.conv2d(out, w[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in w:
                x = bn(F.conv2d(x, w[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + x)
        expected.append(x)
    with torch.no_grad():
        for got, want in zip(encoder(pixels), expected, strict=True):
            assert torch.allclose(got, want, atol=1e-5)


def test_a_wrong_resnet18_file_fails_in_one_line(tmp_path):
    state = random_state(torchvision_resnet18_shapes())
    cases = {"misshaped": (state | {"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)}, "mis-shaped keys: layer2"),
             "missing": ({k: v for k, v in state.items() if "downsample" not in k}, "missing keys: layer2.0.down"),
             "unexpected": (state | {"layer5.0.conv1.weight": torch.zeros(1)}, "unexpected keys: layer5.0.conv1")}
    for name, (contents, problem) in cases.items():
        torch.save(contents, tmp_path / f"{name}.pth")
        with pytest.raises(PathsegError, match=problem) as error:
            UNetResNet18Head(2, tmp_path / f"{name}.pth")
        assert "\n" not in str(error.value) and f"{name}.pth" in str(error.value) and "resnet18" in str(error.value)
    with pytest.raises(PathsegError, match="does not exist"):
        UNetResNet18Head(2, tmp_path / "absent.safetensors")


@pytest.fixture(params=["fcn", "unet"])
def head(request, fcn):
    return fcn if request.param == "fcn" else UNetResNet18Head(K)


def _first_conv(head) -> torch.nn.Parameter:
    return head.fcn.vgg.features[0].weight if isinstance(head, FCN8VGG16Head) else head.unet.encoder.conv1.weight


def test_full_size_logits_for_any_tile_size(head):
    assert head.needs_image is True and head.logits_upsample_last is False and head.num_classes == K
    head.eval()
    with torch.no_grad():
        assert head([image(2, 64)], 64).shape == (2, K, 64, 64)
        assert head([image(2, 48)], 48).shape == (2, K, 48, 48)  # not a multiple of 32: padded, cropped back
        assert head([image(1, 32)], 40).shape == (1, K, 40, 40)
    with pytest.raises(ValueError, match="one input"):
        head([torch.zeros(1, 8, 8, 8), image(1, 32)], 32)


def test_one_step_reaches_the_first_convolution(head):
    # fc6/fc7's own weight gradients (480 MB) are left out, the gradient still passes through them to the first
    # convolution; every parameter the step changes is put back, since the FCN is shared by the module
    trainable = [p for name, p in head.named_parameters() if not name.startswith(("fcn.fc6.", "fcn.fc7."))]
    kept = [p.detach().clone() for p in trainable]
    first = _first_conv(head)
    before = first.detach().clone()
    optimizer = torch.optim.SGD(trainable, lr=1e-2)
    head.train()
    labels = torch.randint(0, K, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    logits, targets = head.training_outputs([image(2, 32)], labels, 32)
    F.cross_entropy(logits, targets).backward(inputs=trainable)
    reached = first.grad is not None and bool(first.grad.abs().sum() > 0)
    optimizer.step()
    moved = not torch.equal(first.detach(), before)
    with torch.no_grad():
        for parameter, value in zip(trainable, kept, strict=True):
            parameter.copy_(value)
            parameter.grad = None
    assert reached and moved


def test_fcn_upsamplings_start_bilinear(fcn):
    ramp = torch.tensor([0.25, 0.75, 0.75, 0.25])
    up2 = fcn.fcn.upscore2.weight
    assert torch.allclose(up2[1, 1], ramp[:, None] * ramp[None, :]) and not up2[0, 1].any()
    # in the interior, the 8x one is bilinear interpolation exactly (torch's align_corners=False convention)
    scores = torch.randn(1, K, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        learned = fcn.fcn.upscore8(scores)
    reference = F.interpolate(scores, scale_factor=8, mode="bilinear", align_corners=False)
    assert learned.shape == reference.shape == (1, K, 48, 48)
    assert torch.allclose(learned[..., 8:-8, 8:-8], reference[..., 8:-8, 8:-8], atol=1e-5)


@pytest.mark.parametrize(("text", "budgets"), [
    ("3", 3),
    ("fcn8-vgg16=1", {"fcn8-vgg16": 1}),
    ("4, fcn8-vgg16=1", {"fcn8-vgg16": 1, "unet-resnet18": 4}),
])
def test_baseline_epochs_per_network(text, budgets):
    from pathseg.train_head.ablation_grid import Cell, run_config
    from pathseg.train_head.cli import parse_baseline_epochs

    from pathseg.config import PipelineConfig

    assert parse_baseline_epochs(text) == budgets
    config = PipelineConfig.model_validate({"train": {"epochs": 7}, "ablate": {"baseline_epochs": budgets}})
    epochs = {kind: run_config(config, Cell((), (), kind), 0).train.epochs for kind in ("unet-resnet18", "fcn8-vgg16")}
    expected = {kind: budgets if isinstance(budgets, int) else budgets.get(kind, 7) for kind in epochs}
    assert epochs == expected
    assert run_config(config, Cell(((50, "up1"),)), 0).train.epochs == 7  # a head on features keeps train.epochs


@pytest.mark.parametrize("text", ["two", "fcn8-vgg16=", "fcn8-vgg16=1.5"])
def test_a_malformed_baseline_budget_fails_in_one_line(text):
    from pathseg.train_head.cli import parse_baseline_epochs

    with pytest.raises(PathsegError, match="--baseline-epochs"):
        parse_baseline_epochs(text)


def test_budgets_for_unknown_networks_or_under_one_epoch_are_refused():
    from pathseg.train_head.ablation_grid import check_baseline_epochs
    from pydantic import ValidationError

    from pathseg.config import PipelineConfig

    with pytest.raises(PathsegError, match="ablate.baseline_epochs: vgg19 is not a supervised network"):
        check_baseline_epochs({"vgg19": 2, "fcn8-vgg16": 1})
    with pytest.raises(ValidationError, match="at least 1"):
        PipelineConfig.model_validate({"ablate": {"baseline_epochs": {"fcn8-vgg16": 0}}})
