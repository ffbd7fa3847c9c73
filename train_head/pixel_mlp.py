"""The `pixel-mlp` kind: ddpm-segmentation's per-pixel MLP ensemble (Baranchuk et al., ICLR 2022), streamed.

The original upsamples every feature map to the image size and holds all of them, for all training images, in
RAM (210 GB for 50 images), then trains on shuffled pixels. Here nothing is ever upsampled whole:

- The first Linear commutes with bilinear upsampling: both are linear, and the interpolation weights of every
  output pixel sum to 1, so the bias commutes too. The first layer is therefore applied per map at the map's
  native resolution (a 1x1 conv with that map's slice of the weight matrix); only the H-channel results are
  upsampled (one per distinct map size) and summed, the bias included. That is exactly the original layer, at the
  cost of a few small 1x1 convs instead of a Linear over every upsampled pixel.
- Training reads the first-layer maps at `pixels_per_tile` random labelled pixels per tile with `grid_sample`,
  which at those pixels equals `F.interpolate(size=T, bilinear, align_corners=False)`: a training step costs
  the sampled pixels, not the tile.
- The forward pass loops over members and tiles, so at most about one tile's (H x T x T) hidden map per member
  is alive at once, whatever the batch or ensemble size.
"""

from __future__ import annotations

import torch
from pathseg.train_head.head_base import HeadBase
from torch import nn
from torch.nn import functional as F


def sample_pixels(
    labels: torch.Tensor, count: int, generator: torch.Generator | None, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, keep), both (B, P) with P = min(count, T*T): flat pixel indices drawn uniformly without replacement
    among each tile's labelled pixels; `keep` is False where a tile has fewer than P labelled pixels.

    Random scores with the unlabelled pixels pushed last, then the P lowest: one vectorised draw for the batch,
    reproducible from `generator` (drawn on the generator's device, so a CPU generator also seeds GPU training).
    """
    flat = labels.reshape(labels.shape[0], -1)
    valid = torch.ones_like(flat, dtype=torch.bool) if ignore_index is None else flat != ignore_index
    device = generator.device if generator is not None else flat.device
    scores = torch.rand(flat.shape, generator=generator, device=device).to(flat.device)
    scores = scores.masked_fill(~valid, 2.0)  # rand is < 1, so any labelled pixel comes before every unlabelled one
    index = scores.topk(min(count, flat.shape[1]), dim=1, largest=False).indices
    return index, valid.gather(1, index)


def pixel_grid(index: torch.Tensor, size: int) -> torch.Tensor:
    """(B, P, 1, 2) grid_sample coordinates of flat pixel indices of a size x size tile.

    Pixel centres in align_corners=False convention, (2i + 1) / size - 1, which is where F.interpolate(size=size,
    align_corners=False) samples its input; padding_mode="border" then matches interpolate's edge clamping.
    """
    ys = torch.div(index, size, rounding_mode="floor")
    xs = index - ys * size
    grid = torch.stack([xs, ys], dim=-1).to(torch.float32).mul_(2.0).add_(1.0).div_(size).sub_(1.0)
    return grid.unsqueeze(2)


class PixelMLP(nn.Module):
    """One ensemble member: Linear(C, H1) -> ReLU -> BatchNorm1d -> ... -> Linear(H_last, K), as ddpm-segmentation
    (its hidden sizes are `hidden`; it uses 256/128, or 128/32 under 30 classes)."""

    def __init__(self, in_channels: list[int], hidden: list[int], num_classes: int) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.first = nn.Linear(sum(in_channels), hidden[0])
        layers: list[nn.Module] = [nn.ReLU(), nn.BatchNorm1d(hidden[0])]
        for width_in, width_out in zip(hidden, hidden[1:], strict=False):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.BatchNorm1d(width_out)]
        layers.append(nn.Linear(hidden[-1], num_classes))
        self.rest = nn.Sequential(*layers)
        for module in self.modules():  # ddpm-segmentation's init_weights('normal', gain=0.02)
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def native_first_layer(self, features: list[torch.Tensor], channels_last: bool = False) -> list[torch.Tensor]:
        """Per distinct map size (B, H1, h, w): the first Linear's share of the maps of that size, at that size.

        Maps of one size (the same block at several timesteps) are summed before any upsampling, which is linear
        too: a tile then costs one upsampling per size, not per map. The bias rides on the first map: interpolation
        weights sum to 1, so it comes out unchanged at every pixel, with no separate pass over the tile to add it.
        `channels_last` is for `tile_hidden`: its upsampled tiles then come out pixel-major and add into its rows
        without a strided pass (about 3x faster on CPU); not for training, where grid_sample is slower on it.
        """
        by_size: dict[tuple[int, ...], torch.Tensor] = {}
        start = 0
        for channels, feature in zip(self.in_channels, features, strict=True):
            weight = self.first.weight[:, start : start + channels, None, None]
            mapped = F.conv2d(feature, weight, self.first.bias if start == 0 else None)
            key = tuple(mapped.shape[-2:])
            by_size[key] = by_size[key] + mapped if key in by_size else mapped
            start += channels
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return [mapped.contiguous(memory_format=layout) for mapped in by_size.values()]

    def tile_hidden(self, native: list[torch.Tensor], tile: int, size: int) -> torch.Tensor:
        """(size * size, H1) first-layer output of one tile: the native maps upsampled and summed.

        Accumulated pixel-major (`native` channels-last makes that free), so the result feeds the rest of the MLP
        without another copy; with channel-major maps `reshape` copies.
        """
        hidden: torch.Tensor | None = None
        for mapped in native:
            if tuple(mapped.shape[-2:]) == (size, size):  # bilinear to its own size is the identity
                up = mapped[tile].permute(1, 2, 0)
                up = up if hidden is not None else up.clone()  # never accumulate into `native` itself
            else:
                up = F.interpolate(mapped[tile : tile + 1], size=(size, size), mode="bilinear", align_corners=False)
                up = up[0].permute(1, 2, 0)
            hidden = up if hidden is None else hidden.add_(up)
        assert hidden is not None
        return hidden.reshape(size * size, -1)

    def tail(self, hidden: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Logits from first-layer outputs (N, H1). In eval mode each BatchNorm1d is folded into the Linear after it
        (an affine map into an affine map), and `inplace` lets the first ReLU overwrite `hidden`: the same numbers
        with three fewer passes over a tile's pixels, the cost that dominates after the matrix products."""
        if self.training:
            return self.rest(hidden)
        layers = list(self.rest)
        x = hidden
        for start in range(0, len(layers), 3):  # (ReLU, BatchNorm1d, Linear) groups
            norm, linear = layers[start + 1], layers[start + 2]
            assert isinstance(norm, nn.BatchNorm1d) and isinstance(linear, nn.Linear)
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            weight = linear.weight * scale
            bias = linear.bias + linear.weight @ (norm.bias - norm.running_mean * scale)
            x = torch.addmm(bias, F.relu(x, inplace=inplace or x is not hidden), weight.T)
        return x

    def sampled_hidden(self, native: list[torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
        """(B, P, H1) first-layer output at the grid's pixels, as `tile_hidden` would give it there."""
        samples = [F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=False) for m in native]
        return torch.stack(samples).sum(0)[..., 0].transpose(1, 2)


class PixelMLPEnsemble(HeadBase):
    """`ensemble` independent PixelMLP members over every map bilinearly upsampled to the tile size.

    The forward pass returns log of the members' mean softmax probabilities (B, K, T, T): a soft vote.
    ddpm-segmentation takes a majority vote of the members' argmax labels; the stitcher here blends overlapping
    tiles by weighted averaging, which needs continuous values, and the mean of probabilities is the continuous
    counterpart of that vote. Logs, so consumers that softmax or argmax "logits" get the mean probabilities back.
    """

    logits_upsample_last = False  # an MLP per output pixel: its logits exist only at the tile size

    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        hidden: list[int] | tuple[int, ...] = (256, 128),
        ensemble: int = 10,
        pixels_per_tile: int = 1024,
    ) -> None:
        super().__init__()
        if not hidden or ensemble < 1 or pixels_per_tile < 1:
            raise ValueError("pixel-mlp needs at least one hidden layer, one member and one pixel per tile")
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        self.pixels_per_tile = pixels_per_tile
        self.members = nn.ModuleList(PixelMLP(in_channels, list(hidden), num_classes) for _ in range(ensemble))

    def forward(self, features: list[torch.Tensor], output_size: int) -> torch.Tensor:
        batch, size = features[0].shape[0], output_size
        probabilities = features[0].new_zeros(batch, self.num_classes, size, size, dtype=torch.float32)
        for member in self.members:
            native = member.native_first_layer(features, channels_last=True)  # small: native resolution
            for tile in range(batch):
                logits = member.tail(member.tile_hidden(native, tile, size), inplace=True)  # (size * size, K)
                probabilities[tile] += logits.float().softmax(dim=1).T.reshape(self.num_classes, size, size)
        probabilities /= len(self.members)
        return probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()

    def training_outputs(
        self,
        features: list[torch.Tensor],
        labels: torch.Tensor,
        output_size: int,
        generator: torch.Generator | None = None,
        ignore_index: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (M, K, N, 1), targets (M, N, 1)) at N sampled labelled pixels of the batch, for M members.

        Cross-entropy over that pair is the mean of the members' own losses; members share no parameters, so one
        AdamW step on it trains each member as if alone (Adam is invariant to the 1/M scale). With `ce+dice` the Dice
        term pools the members' pixels, which couples them a little; ddpm-segmentation trains with CE only
        (train.loss: ce), the faithful setting. Each member draws
        its own pixels, as each of ddpm-segmentation's members shuffles the pixels into its own batches; N is the
        same for all, since a tile gives min(pixels_per_tile, its labelled pixels) whatever the draw.
        """
        if labels.shape[-1] != output_size:
            raise ValueError(f"labels are {labels.shape[-1]} px, not the output size {output_size}")
        flat_labels = labels.reshape(labels.shape[0], -1)
        logits, targets = [], []
        for member in self.members:
            index, keep = sample_pixels(labels, self.pixels_per_tile, generator, ignore_index)
            chosen = keep.flatten().nonzero().squeeze(1)
            if chosen.numel() == 1:  # BatchNorm1d in train mode needs 2 rows; one pixel twice is the same loss
                chosen = chosen.repeat(2)
            grid = pixel_grid(index, output_size).to(features[0].dtype)
            hidden = member.sampled_hidden(member.native_first_layer(features), grid)
            logits.append(member.tail(hidden.reshape(-1, hidden.shape[-1])[chosen]))
            targets.append(flat_labels.gather(1, index).flatten()[chosen])
        return torch.stack(logits).transpose(1, 2).unsqueeze(-1), torch.stack(targets).unsqueeze(-1)
