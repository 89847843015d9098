"""The inference pipeline: preprocess / forward / postprocess, each usable alone.

It computes what the model card computes (SegformerImageProcessor -> model -> bilinear upsample with
`align_corners=False` -> argmax) with less work:

- preprocess: the same PIL bilinear resize, then a 256-entry lookup table per channel that holds the
  processor's exact rescale+normalise results (bit-identical pixel values, no float64 round trip);
- forward: the encoder as is; the all-MLP decode head rearranged. The head's 1x1 fuse conv over the
  4x768 concatenated, upsampled features equals the sum over stages of (fuse_i @ proj_i) applied at each
  stage's own low resolution and then upsampled, because bilinear upsampling is linear, per channel,
  and its weights sum to one. Folding the eval-mode BatchNorm in as well removes the 4x768x128x128
  concatenation and most of the head's multiply-adds; the logits agree to float rounding;
- postprocess: the upsample+argmax runs on the device in row chunks, so a 24-megapixel photo never
  holds its full 19xHxW logits. Where all four low-res neighbours of an output pixel share one argmax
  the upsampled argmax is that label (a convex combination of vectors that share an argmax keeps it,
  ties aside), so only pixels near label boundaries need their 19 interpolated logits.

The three stages hold no Python-side mutable state, so separate threads may run them concurrently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from worker.model import RANDOM_WEIGHTS_ATTR

if TYPE_CHECKING:
    from collections.abc import Sequence

# Logit elements one postprocess chunk may hold at once (19 labels x rows x width, float32): 16 MB.
CHUNK_ELEMENTS = 4_000_000
# Above this share of boundary pixels the dense path is cheaper than gathering corners.
DENSE_FRACTION = 0.6
_BOUNDARY = 255


class FaceParser:
    """A loaded face-parsing SegFormer and its preprocessing, split into three stages."""

    def __init__(self, model: Any, processor: Any, *, model_name: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model = model
        self.model_name = model_name
        self.device = torch.device(device)
        self.dtype = dtype
        config = model.config
        self.id2label: dict[int, str] = {int(k): str(v) for k, v in config.id2label.items()}
        self.num_labels = int(config.num_labels)
        self.random_weights = bool(getattr(config, RANDOM_WEIGHTS_ATTR, False))
        self._size, self._resample = _target_size(processor)
        self._lut = _normalisation_table(processor)
        self._head = _fold_decode_head(model.decode_head, config, dtype=dtype, device=self.device)

    # --- preprocess: CPU, PIL -------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images -> float32 pixel values (B, 3, H, W) on the CPU, as SegformerImageProcessor gives."""
        height, width = self._size
        batch = np.empty((len(images), height, width, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            if image.mode != "RGB":
                image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), resample=self._resample)
            batch[i] = np.asarray(image)
        # Lookup per channel: exactly the processor's float64 rescale then float32 normalise.
        pixels = np.empty((len(images), 3, height, width), dtype=np.float32)
        for c in range(3):
            np.take(self._lut[c], batch[..., c], out=pixels[:, c])
        return torch.from_numpy(pixels)

    # --- forward: on the device ------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values -> float32 logits (B, num_labels, H/4, W/4), left on the device."""
        with torch.inference_mode():
            pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
            encoder = self.model.segformer(pixel_values, output_hidden_states=True, return_dict=True)
            logits = self._head(encoder.hidden_states)
            return logits.float()

    # --- postprocess: on the device, only uint8 leaves ----------------------------------------
    def postprocess(self, logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Logits -> one uint8 label mask (H, W) per image at its own (height, width), on the CPU."""
        if len(sizes) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit maps but {len(sizes)} sizes")
        with torch.inference_mode():
            return [upsample_argmax(logits[i], (int(h), int(w))).cpu().numpy()
                    for i, (h, w) in enumerate(sizes)]

    def postprocess_one(self, logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """One image's logits (num_labels, H/4, W/4) -> its uint8 mask at (height, width)."""
        return self.postprocess(logits[None], [size])[0]

    def summarize(self, mask: np.ndarray) -> dict[str, Any]:
        """The label summary of one mask, with this model's names (and the noise warning if random)."""
        from worker.outputs import summarize

        return summarize(mask, self.id2label, random_weights=self.random_weights)

    def parse_batch(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """All three stages for one batch of RGB images: a uint8 label mask per image."""
        if not images:
            return []
        logits = self.forward(self.preprocess(images))
        return self.postprocess(logits, [(im.height, im.width) for im in images])


# --- preprocess helpers -------------------------------------------------------------------
def _target_size(processor: Any) -> tuple[tuple[int, int], Image.Resampling]:
    size = processor.size
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    width = size.get("width") if isinstance(size, dict) else getattr(size, "width", None)
    if not (processor.do_resize and height and width):
        raise ValueError(f"expected a fixed height x width resize in the image-processor config, got {size}")
    return (int(height), int(width)), Image.Resampling(int(processor.resample))


def _normalisation_table(processor: Any) -> np.ndarray:
    """(3, 256) float32: the value SegformerImageProcessorPil gives each 8-bit level per channel."""
    levels = np.arange(256, dtype=np.float64)
    table = np.repeat(levels[None, :], 3, axis=0)
    if processor.do_rescale:
        table = table * float(processor.rescale_factor)
    table = table.astype(np.float32)
    if processor.do_normalize:
        mean = np.asarray(processor.image_mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(processor.image_std, dtype=np.float32).reshape(3, 1)
        table = (table - mean) / std
    return np.ascontiguousarray(table, dtype=np.float32)


# --- the rearranged decode head -----------------------------------------------------------
class _FoldedHead:
    """SegformerDecodeHead with fuse conv and BatchNorm folded into each stage's projection.

    Per stage i: y_i = x_i @ A_i^T at the stage's resolution (A_i = s * fuse_i @ proj_i), bilinearly
    upsampled to stage 1's resolution and summed; plus one bias b = s*(sum_i fuse_i @ bias_i) + t; then
    ReLU and the classifier. s, t: the BatchNorm's eval-mode scale and shift.
    """

    def __init__(self, weights: list[torch.Tensor], bias: torch.Tensor, classifier_w: torch.Tensor,
                 classifier_b: torch.Tensor) -> None:
        self.weights = weights
        self.bias = bias
        self.classifier_w = classifier_w
        self.classifier_b = classifier_b

    def __call__(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        first = hidden_states[0]
        batch, _, height, width = first.shape
        fused = None
        for x, weight in zip(hidden_states, self.weights, strict=True):
            # (B, C, h, w) -> channels-last tokens, projected straight to the fused width.
            y = torch.matmul(x.permute(0, 2, 3, 1), weight.t())  # (B, h, w, D)
            if y.shape[1:3] != (height, width):
                y = F.interpolate(y.permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            fused = y if fused is None else fused.add_(y)
        assert fused is not None
        hidden = torch.relu_(fused.add_(self.bias))
        logits = torch.matmul(hidden, self.classifier_w.t()).add_(self.classifier_b)  # (B, h, w, L)
        return logits.permute(0, 3, 1, 2).reshape(batch, -1, height, width)


def _fold_decode_head(head: Any, config: Any, *, dtype: torch.dtype, device: torch.device) -> _FoldedHead:
    if getattr(config, "reshape_last_stage", True) is False:
        raise ValueError("decode heads over unreshaped last stages are not supported")
    hidden = int(config.decoder_hidden_size)
    stages = len(head.linear_projections)
    with torch.no_grad():
        fuse = head.linear_fuse.weight.detach().double().reshape(hidden, stages * hidden)
        bn = head.batch_norm
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.double() - bn.running_mean.double() * scale
        weights: list[torch.Tensor] = []
        bias = shift.clone()
        for i, proj in enumerate(head.linear_projections):
            # The head concatenates the stages in reverse order: stage i sits in block (stages-1-i).
            block = fuse[:, (stages - 1 - i) * hidden:(stages - i) * hidden]
            weights.append((scale[:, None] * (block @ proj.proj.weight.double())).to(device, dtype))
            bias += scale * (block @ proj.proj.bias.double())
        classifier = head.classifier
        classifier_w = classifier.weight.detach().reshape(classifier.out_channels, hidden)
        return _FoldedHead(
            weights,
            bias.to(device, dtype),
            classifier_w.to(device, dtype),
            classifier.bias.detach().to(device, dtype),
        )


# --- postprocess helpers ------------------------------------------------------------------
def _linear_indices(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Source indices and weights of a 1-D bilinear resize, as torch computes them (align_corners=False)."""
    scale = in_size / out_size
    src = (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5
    src = src.clamp_(min=0)
    low = src.floor().long().clamp_(max=in_size - 1)
    high = (low + 1).clamp_(max=in_size - 1)
    w_high = (src - low.float()).clamp_(0, 1)
    return low, high, 1.0 - w_high, w_high


def upsample_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """argmax over labels of `logits` (L, h, w) bilinearly resized to `size`, as uint8 (H, W) on the device.

    Equal (ties aside) to `F.interpolate(logits[None], size, mode="bilinear").argmax(1)` but in row
    chunks, and interpolating full label vectors only where the four low-res neighbours disagree.
    """
    labels, in_h, in_w = logits.shape
    if labels > _BOUNDARY:
        raise ValueError(f"{labels} labels do not fit a uint8 mask")
    out_h, out_w = size
    device = logits.device
    # Channels-last (h, w, L): every gather below reads whole label vectors, and argmax over a
    # contiguous last dim is ~4x faster on CPU than over dim 0. The head's logits already are.
    logits = logits.float().permute(1, 2, 0).contiguous()
    y0, y1, wy0, wy1 = _linear_indices(in_h, out_h, device)
    x0, x1, wx0, wx1 = _linear_indices(in_w, out_w, device)
    # Each output pixel reads the 2x2 low-res cell at (y0, x0). Where the cell's four argmaxes agree,
    # that label is the answer; else BOUNDARY (255, never a label: L <= 255 is checked above).
    # At the clamped last row/column the check is stricter than needed, which is only slower.
    low = logits.argmax(-1)
    right = torch.cat([low[:, 1:], low[:, -1:]], 1)
    below = torch.cat([low[1:], low[-1:]], 0)
    diagonal = torch.cat([right[1:], right[-1:]], 0)
    same = (low == right) & (low == below) & (low == diagonal)
    cell_code = torch.where(same, low, torch.full_like(low, _BOUNDARY)).to(torch.uint8)
    # Width pass once for all rows: (h, W, L); bounded by the low-res height, not the output's.
    # index_select, not advanced indexing: several times faster on CPU.
    across = logits.index_select(1, x0).mul_(wx0[:, None])
    across.add_(logits.index_select(1, x1).mul_(wx1[:, None]))
    flat = across.reshape(in_h * out_w, labels)
    out = torch.empty((out_h, out_w), dtype=torch.uint8, device=device)
    rows = max(1, CHUNK_ELEMENTS // max(1, labels * out_w))
    for start in range(0, out_h, rows):
        stop = min(out_h, start + rows)
        r0, r1 = y0[start:stop], y1[start:stop]
        chunk = out[start:stop]
        torch.index_select(cell_code.index_select(0, r0), 1, x0, out=chunk)
        where = (chunk.reshape(-1) == _BOUNDARY).nonzero().squeeze(1)
        if where.numel() == 0:
            continue
        if where.numel() > DENSE_FRACTION * chunk.numel():
            top = across.index_select(0, r0).mul_(wy0[start:stop, None, None])
            full = top.add_(across.index_select(0, r1).mul_(wy1[start:stop, None, None]))
            chunk.copy_(full.argmax(-1))
            continue
        rr = torch.div(where, out_w, rounding_mode="floor")
        cc = where - rr * out_w
        top = flat.index_select(0, r0.index_select(0, rr).mul_(out_w).add_(cc))
        top.mul_(wy0[start:stop].index_select(0, rr)[:, None])
        bottom = flat.index_select(0, r1.index_select(0, rr).mul_(out_w).add_(cc))
        bottom.mul_(wy1[start:stop].index_select(0, rr)[:, None])
        chunk.view(-1).index_copy_(0, where, top.add_(bottom).argmax(-1).to(torch.uint8))
    return out


def reference_masks(model: Any, processor: Any, images: Sequence[Image.Image]) -> list[np.ndarray]:
    """The model card's code, for parity tests and benchmarks: processor -> model -> upsample -> argmax."""
    with torch.inference_mode():
        inputs = processor(images=list(images), return_tensors="pt")
        logits = model(pixel_values=inputs["pixel_values"].to(model.device, model.dtype)).logits
        out = []
        for i, image in enumerate(images):
            up = F.interpolate(logits[i:i + 1].float(), size=(image.height, image.width), mode="bilinear",
                               align_corners=False)
            out.append(up[0].argmax(0).to(torch.uint8).cpu().numpy())
    return out
