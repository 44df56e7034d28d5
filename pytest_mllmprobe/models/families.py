"""Per-family quirks that the module tree alone does not tell.

:class:`~pytest_mllmprobe.models.stages.StageMap` stays the one description of *where* the
stages are; this registry says *how* to read them for a family (``config.model_type``):

* which connector module lives inside the vision encoder (Qwen2-VL's ``visual.merger``) or has
  a family-specific name (BLIP-2's Q-Former feeds ``language_projection``, whose output is read),
* how the vision and connector outputs split into images (:func:`segments`): several tiles
  per image (LLaVA-NeXT, Idefics3, InternVL) or one flat ``[sum of patches, hidden]`` sequence
  for the whole batch (Qwen2-VL, Pixtral), split by per-image patch counts,
* whether the processor takes the images of a batch as one list per prompt (Gemma 3),
* whether the processor's output needs a fix before the forward (InstructBLIP's Q-Former
  prompt is re-padded on the right),
* whether the position ids may be rebuilt from the attention mask (one-dimensional rotary
  positions only; Qwen's multimodal rotary positions are computed by the model itself),
* whether the connector always reads the last vision block (no ``vision_feature_layer``).

A family that is not listed here uses the defaults: one vision row per image, the connector
found by name outside the vision encoder, positions left to the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SegmentFn = Callable[[Any, Any, dict[str, Any]], "Segments"]


@dataclass(frozen=True)
class Segments:
    """How the vision and connector outputs of one batch split into images.

    For a ``[rows, tokens, hidden]`` output an entry counts the rows (tiles) of each image;
    when ``flat``, the whole batch is one token sequence (``[tokens, hidden]``, or
    ``[1, tokens, hidden]`` for Pixtral) and an entry counts the tokens of each image.
    ``None`` means one row per image. ``vision_mask`` / ``connector_mask`` (bool
    ``[rows, tokens]``, True for a real token) leave padding tokens out of the mean: patches of
    padded image regions (Idefics2), padded tiles and patch padding (Mllama); an image is then
    the mean over all its real tokens.
    """

    vision: tuple[int, ...] | None = None
    connector: tuple[int, ...] | None = None
    flat: bool = False
    vision_mask: Any = None
    connector_mask: Any = None


@dataclass(frozen=True)
class Family:
    """What extraction must know about one ``model_type``."""

    #: names of the connector module when it lives inside the vision encoder (tried in order)
    connector_in_vision: tuple[str, ...] = ()
    #: family-specific connector names, tried before the generic ones (outside vision and LM);
    #: the hooked module is the connector's *last* one (BLIP-2: the Q-Former, then this projection)
    connector_names: tuple[str, ...] = ()
    #: position ids may be rebuilt from the attention mask (1-D rotary positions)
    mask_positions: bool = False
    #: ``segments(stage_map, model, inputs)``; ``None``: one vision row per image
    segments: SegmentFn | None = None
    #: the processor wants the images of a batch as one list per prompt (``[[image], ...]``)
    nested_images: bool = False
    #: the connector always reads the last vision block (no ``vision_feature_layer`` to consult)
    reads_last_layer: bool = False
    #: ``adjust(inputs) -> inputs``: fixes the processor's output before the forward
    adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    #: layer lists under the vision encoder that form the vision stage, in forward order
    #: (Mllama: the local encoder, then the global one); empty: the largest layer list
    vision_layer_lists: tuple[str, ...] = ()
    #: ``consumed(config, n_vision_layers) -> vision block indices`` the connector reads, for
    #: families whose config does not say it with ``vision_feature_layer``
    consumed: Callable[[Any, int], tuple[int, ...]] | None = None
    #: the language model reads the image through cross-attention layers (Mllama): no image
    #: tokens in its stream, so only the ``last`` readout exists, and the image reaches it at
    #: the first cross-attention layer (``llm_entry``)
    cross_attention: bool = False
    #: the model re-packs the connector's tile outputs before the language model reads them
    #: (LLaVA-NeXT: unpadding and newline tokens), so connector tokens != image tokens
    repacks: bool = False


def _llava_next_segments(stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
    """LLaVA-NeXT / LLaVA-OneVision: tiles over ``image_grid_pinpoints`` plus the whole image."""
    if "image_sizes" not in inputs:
        return Segments()
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    tiles = tuple(
        int(image_size_to_num_patches(
            image_size=tuple(size.tolist()),
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=config.vision_config.image_size,
        ))
        for size in inputs["image_sizes"]
    )
    return Segments(vision=tiles, connector=tiles)


def _grid_segments(stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
    """Qwen-VL: the vision blocks see ``t*h*w`` patches per image, the merger ``t*h*w / m**2``."""
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return Segments()
    merge = int(model.config.vision_config.spatial_merge_size)
    patches = tuple(int(n) for n in grid.prod(-1).tolist())
    return Segments(vision=patches, connector=tuple(n // merge**2 for n in patches), flat=True)


def _pixtral_segments(stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
    """Mistral3: Pixtral concatenates every image's patches into one ``[1, patches, hidden]``
    sequence (``image_sizes`` / ``patch_size`` per image); its patch merger joins m x m patches."""
    sizes = inputs.get("image_sizes")
    if sizes is None:
        return Segments()
    patch = int(model.config.vision_config.patch_size)
    merge = int(model.config.spatial_merge_size)
    grids = [(int(h) // patch, int(w) // patch) for h, w in sizes.tolist()]
    return Segments(
        vision=tuple(h * w for h, w in grids),
        connector=tuple((h // merge) * (w // merge) for h, w in grids),
        flat=True,
    )


def _real_tile_segments(stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
    """Idefics2 / Idefics3 / SmolVLM: ``pixel_values`` is ``[batch, tiles, C, H, W]``, padded
    with all-zero tiles; the model drops those, so each image has as many vision rows as it has
    real tiles. Tiles padded to the batch's largest image (``pixel_attention_mask``) carry
    padding patches, which the vision blocks output too: the mask leaves them out, as the
    model's own ``patch_attention_mask`` does (a patch is real when all its pixels are)."""
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.dim() != 5:
        return Segments()
    real = (pixels != 0).flatten(2).any(-1)
    tiles = tuple(int(n) for n in real.sum(1).tolist())
    pixel_mask = inputs.get("pixel_attention_mask")
    if pixel_mask is None:
        return Segments(vision=tiles, connector=tiles)
    patch = int(model.config.vision_config.patch_size)
    kept = pixel_mask[real].unfold(1, patch, patch).unfold(2, patch, patch)
    patch_mask = (kept.sum(dim=(-1, -2)) == patch * patch).flatten(1)
    if bool(patch_mask.all()):  # every tile of the batch has the same size (Idefics3's square tiles)
        return Segments(vision=tiles, connector=tiles)
    return Segments(vision=tiles, connector=tiles, vision_mask=patch_mask)


def _token_tile_segments(stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
    """InternVL, Aya Vision: ``pixel_values`` holds every tile of the batch; the processor does
    not return the tiles per image, but each tile becomes the same number of image tokens in the
    prompt: ``(image_size / patch_size)**2`` patches, pixel-shuffled by the connector."""
    config = model.config
    vision = config.vision_config
    side = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    ratio = getattr(config, "downsample_ratio", None) or 1 / getattr(config, "downsample_factor", 1)
    per_tile = round((side // patch) ** 2 * ratio**2)
    counts = (inputs["input_ids"] == stage_map.image_token_id).sum(1).tolist()
    tiles = tuple(int(n) // per_tile for n in counts)
    return Segments(vision=tiles, connector=tiles)


def _mllama_segments(stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
    """Mllama: one vision row per image holding ``tiles x padded`` tokens: per tile a class
    token, the patches, then padding up to a multiple of 8; tiles beyond the image's own are
    padding (``aspect_ratio_mask``). The vision mean is over real patches of real tiles; the
    connector (``[batch, images, tiles, 1 + patches, hidden]``) over the class and patch tokens
    of real tiles: what the language model cross-attends to."""
    import torch

    tiles = inputs.get("aspect_ratio_mask")
    if tiles is None:
        return Segments()
    vision = model.config.vision_config
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    padded = patches + 1 + (8 - (patches + 1) % 8) % 8
    tiles = tiles.reshape(-1, tiles.shape[-1]).bool()  # [batch x images, tiles]
    real_patch = torch.zeros(padded, dtype=torch.bool, device=tiles.device)
    real_patch[1:1 + patches] = True
    read = torch.ones(patches + 1, dtype=torch.bool, device=tiles.device)
    return Segments(
        vision_mask=(tiles[:, :, None] & real_patch).flatten(1),
        connector_mask=(tiles[:, :, None] & read).flatten(1),
    )


def _mllama_consumed(config: Any, n_layers: int) -> tuple[int, ...]:
    """The projector reads the last global block and the local blocks of
    ``intermediate_layers_indices`` (outputs of blocks 0, 1, ...: no embedding entry)."""
    local = getattr(config.vision_config, "intermediate_layers_indices", None) or ()
    return tuple(sorted({int(i) for i in local if 0 <= int(i) < n_layers} | {n_layers - 1}))


def _right_pad(ids: Any, mask: Any) -> tuple[Any, Any]:
    """Move each row's padding to the end (a left-padded row becomes right-padded)."""
    import torch

    length = ids.shape[1]
    pads = (mask == 0).long().cumprod(dim=1).sum(dim=1, keepdim=True)  # leading pads per row
    index = (torch.arange(length, device=ids.device).unsqueeze(0) + pads) % length
    return ids.gather(1, index), mask.gather(1, index)


def _qformer_right_padded(inputs: dict[str, Any]) -> dict[str, Any]:
    """InstructBLIP: the Q-Former reads the prompt with absolute (BERT) positions, so its
    input must be padded on the right whatever side the language model's prompt is padded on."""
    if "qformer_input_ids" in inputs and "qformer_attention_mask" in inputs:
        inputs = dict(inputs)
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = _right_pad(
            inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
        )
    return inputs


QWEN = Family(connector_in_vision=("merger",), segments=_grid_segments, reads_last_layer=True)
BLIP = Family(connector_names=("language_projection",), reads_last_layer=True)

FAMILIES: dict[str, Family] = {
    # LLaVA and its descendants: CLIP/SigLIP tower, projector, 1-D rotary decoder
    "llava": Family(mask_positions=True),
    "vipllava": Family(mask_positions=True),
    "llava_next": Family(mask_positions=True, segments=_llava_next_segments, repacks=True),
    "llava_onevision": Family(mask_positions=True, segments=_llava_next_segments, repacks=True),
    "mistral3": Family(mask_positions=True, segments=_pixtral_segments),
    "internvl": Family(mask_positions=True, segments=_token_tile_segments),
    "aya_vision": Family(mask_positions=True, segments=_token_tile_segments),
    "gemma3": Family(mask_positions=True, nested_images=True, reads_last_layer=True),
    "deepseek_vl": Family(mask_positions=True, reads_last_layer=True),
    "janus": Family(mask_positions=True, reads_last_layer=True),
    # PaliGemma counts positions from 1: left to the model (rotary, so padding shifts nothing)
    "paligemma": Family(reads_last_layer=True),
    "idefics2": Family(mask_positions=True, segments=_real_tile_segments, reads_last_layer=True),
    "idefics3": Family(mask_positions=True, segments=_real_tile_segments, reads_last_layer=True),
    "smolvlm": Family(mask_positions=True, segments=_real_tile_segments, reads_last_layer=True),
    # Qwen-VL: the merger inside the vision encoder is the connector; mrope positions are the model's
    "qwen2_vl": QWEN,
    "qwen2_5_vl": QWEN,
    "qwen3_vl": QWEN,
    "glm4v": QWEN,  # the same layout: blocks, then downsample + merger, mrope positions
    # BLIP-2: Q-Former + language_projection form the connector; OPT positions follow the mask
    "blip-2": BLIP,
    "instructblip": Family(connector_names=BLIP.connector_names, reads_last_layer=True, adjust=_qformer_right_padded),
    # Llama 3.2 Vision: local + global vision encoders, a linear projector, cross-attention decoder
    "mllama": Family(
        mask_positions=True, nested_images=True, segments=_mllama_segments,
        vision_layer_lists=("transformer.layers", "global_transformer.layers"), consumed=_mllama_consumed,
        cross_attention=True,
    ),
}

DEFAULT = Family()


def family(name: str) -> Family:
    """The quirks of ``name`` (a ``config.model_type``); the defaults for unlisted families."""
    return FAMILIES.get(name, DEFAULT)


def segments(stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
    """How this batch's vision and connector outputs split into images."""
    fn = family(stage_map.family).segments
    return fn(stage_map, model, inputs) if fn is not None else Segments()
