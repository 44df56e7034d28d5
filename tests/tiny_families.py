"""Tiny, offline models of more transformers VLM families, for architecture tests.

Each builder returns ``(model, processor)``: a randomly initialised real transformers
architecture built from its config classes (hidden 32, two layers per stage) and a processor
made of a word-level tokenizer (the demo's vocabulary plus the family's special tokens), the
family's image processor built from a dict (the PIL one: no torchvision here) and a chat
template that writes the family's image placeholder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pytest_mllmprobe.demo.tiny import build_tokenizer, chat_template
from pytest_mllmprobe.models.load import video_slot_may_be_empty

MEAN = [0.5, 0.5, 0.5]


def family_tokenizer(
    image_token: str, specials: tuple[str, ...] = (), attrs: dict[str, str] | None = None, *, register: bool = True
) -> Any:
    """A word-level tokenizer: ``<pad> <s> </s> <unk>``, the image token, ``specials``, words.

    ``register`` names the image token as the tokenizer's ``image_token`` (BLIP-2's processor
    wants to add it itself).
    """
    return build_tokenizer(
        specials=("<pad>", "<s>", "</s>", "<unk>", image_token, *specials),
        extra_special_tokens={**({"image_token": image_token} if register else {}), **(attrs or {})},
        model_max_length=4096,
    )


def _text(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    config = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config.update(extra)
    return config


def save_processor(processor: Any, path: Any) -> None:
    """``processor.save_pretrained(path)``, also for a processor built without its video processor.

    ``save_pretrained`` cannot save an empty video slot; the parts are then written as a
    checkpoint holds them (image processor, tokenizer, chat template, the processor's own
    settings in ``processor_config.json``), which ``AutoProcessor`` loads back with
    torchvision and :func:`pytest_mllmprobe.models.load.processor_without_video` without.
    """
    import inspect
    import json
    from pathlib import Path

    if getattr(processor, "video_processor", True) is not None:
        processor.save_pretrained(path)
        return
    path = Path(path)
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(processor.chat_template)
    own = {key: getattr(processor, key) for key in inspect.signature(type(processor).__init__).parameters
           if key not in ("self", "kwargs", "chat_template", *processor.get_attributes())
           and isinstance(getattr(processor, key, None), (int, float, str, bool))}
    (path / "processor_config.json").write_text(json.dumps({"processor_class": type(processor).__name__, **own}))


def _qwen(family: str) -> tuple[Any, Any]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = family_tokenizer(
        "<|image_pad|>", ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
        {"video_token": "<|video_pad|>"},
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=16 * 16, max_pixels=48 * 48, patch_size=8, merge_size=2, temporal_patch_size=2,
        image_mean=MEAN, image_std=MEAN,
    )
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = _text(tokenizer, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLProcessor

        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        processor_class = Qwen2VLProcessor
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLProcessor

        # deepstack: blocks 0 and 1 also feed the first language-model layers through their own mergers
        vision = dict(depth=3, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                      patch_size=8, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 1])
        text = _text(tokenizer, head_dim=8, rope_parameters={
            "rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True, "rope_theta": 10000.0,
        })
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        processor_class = Qwen3VLProcessor
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

        # window 32 px = 2x2 merge units: images of 3x3 units are reordered window by window
        vision = dict(depth=3, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                      patch_size=8, spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                      fullatt_block_indexes=[2])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        processor_class = Qwen2_5_VLProcessor
    with video_slot_may_be_empty():
        processor = processor_class(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
        )
    return config, processor


def _glm4v() -> tuple[Any, Any]:
    from transformers import Glm4vConfig, Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    specials = ("<|begin_of_image|>", "<|end_of_image|>", "<|video|>", "<|begin_of_video|>", "<|end_of_video|>")
    tokenizer = family_tokenizer("<|image|>", specials, {"video_token": "<|video|>"})
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>"),
    )}
    text = _text(tokenizer, head_dim=8, rope_parameters={
        "rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
    })
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, image_size=32,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    config = Glm4vConfig(text_config=text, vision_config=vision, **ids)
    image_processor = Glm4vImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}, patch_size=8, merge_size=2, temporal_patch_size=2,
        image_mean=MEAN, image_std=MEAN,
    )
    with video_slot_may_be_empty():
        processor = Glm4vProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   chat_template=chat_template("<|begin_of_image|><|image|><|end_of_image|>"))
    return config, processor


def _siglip(image_size: int = 32, **extra: Any) -> dict[str, Any]:
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    config.update(extra)
    return config


def _gemma3() -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = family_tokenizer(
        "<image_soft_token>", ("<start_of_image>", "<end_of_image>"),
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    )
    text = _text(tokenizer, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                 query_pre_attn_scalar=8)
    config = Gemma3Config(
        text_config=text, vision_config=_siglip(), mm_tokens_per_image=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=MEAN)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                chat_template=chat_template("<start_of_image>"))
    return config, processor


def _paligemma() -> tuple[Any, Any]:
    from transformers import PaliGemmaConfig, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = family_tokenizer("<image>")
    text = _text(tokenizer, head_dim=8, model_type="gemma")
    config = PaliGemmaConfig(
        text_config=text, vision_config=_siglip(projection_dim=32), projection_dim=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=MEAN)
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=chat_template("<image>"))
    return config, processor


def _idefics3(smol: bool = False) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3Processor, SmolVLMConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tiles = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
    tokenizer = family_tokenizer(
        "<image>", ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<video>", *tiles)
    )
    config = (SmolVLMConfig if smol else Idefics3Config)(
        text_config=_text(tokenizer, model_type="llama"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    # longest edge 96 in tiles of 32: a square image is 3 x 3 tiles, a 3:2 one 3 x 2 (plus the global image)
    image_processor = (SmolVLMImageProcessorPil if smol else Idefics3ImageProcessorPil)(
        size={"longest_edge": 96}, max_image_size={"longest_edge": 32}, do_image_splitting=True,
        image_mean=MEAN, image_std=MEAN,
    )
    # SmolVLMProcessor needs num2words (not installed here); for images it writes the same tile
    # prompt as Idefics3Processor, which stands in for it
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=chat_template("<image>"))
    return config, processor


def _idefics2() -> tuple[Any, Any]:
    from transformers import Idefics2Config, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tokenizer = family_tokenizer("<image>", ("<fake_token_around_image>", "<end_of_utterance>"),
                                 {"image_boundary_token": "<fake_token_around_image>"})
    config = Idefics2Config(
        text_config=_text(tokenizer, model_type="mistral", head_dim=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=48, patch_size=8),
        # the perceiver resampler turns every tile into 4 latents, whatever its size
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4,
                              resampler_head_dim=8, num_key_value_heads=2),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
    )
    # images keep their aspect ratio (shortest edge 24, longest 48) and are padded to the largest
    # of the batch (pixel_attention_mask); splitting gives 4 crops plus the whole image
    image_processor = Idefics2ImageProcessorPil(
        size={"shortest_edge": 24, "longest_edge": 48}, do_image_splitting=True, image_mean=MEAN, image_std=MEAN,
    )
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=chat_template("<image>"))
    return config, processor


def _llava_onevision() -> tuple[Any, Any]:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tokenizer = family_tokenizer("<image>", ("<video>",), {"video_token": "<video>"})
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        text_config=_text(tokenizer, model_type="qwen2"), vision_config=_siglip(model_type="siglip_vision_model"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
    )
    # any-resolution tiling: an image is 1, 2 or 4 tiles of 32 px plus the whole image
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints, image_mean=MEAN, image_std=MEAN,
    )
    with video_slot_may_be_empty():
        processor = LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, num_image_tokens=16,
            vision_feature_select_strategy="full", chat_template=chat_template("<image>"),
        )
    return config, processor


def _deepseek_vl() -> tuple[Any, Any]:
    from transformers import DeepseekVLConfig, DeepseekVLProcessor
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

    tokenizer = family_tokenizer("<image_placeholder>")
    config = DeepseekVLConfig(
        text_config=_text(tokenizer, model_type="llama"), vision_config=_siglip(model_type="siglip_vision_model"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"), tie_word_embeddings=False,
    )
    image_processor = DeepseekVLImageProcessorPil(size={"height": 32, "width": 32}, min_size=8,
                                                  image_mean=MEAN, image_std=MEAN)
    processor = DeepseekVLProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
                                    chat_template=chat_template("<image_placeholder>"))
    return config, processor


def _janus() -> tuple[Any, Any]:
    from transformers import JanusConfig, JanusProcessor
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    tokenizer = family_tokenizer(
        "<image_placeholder>", ("<begin_of_image>", "<end_of_image>"),
        {"boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"},
    )
    config = JanusConfig(
        text_config=_text(tokenizer, model_type="llama"),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                           mlp_ratio=2, projection_dim=32, depth=2, num_image_tokens=16),
        # the image-generation half (VQ-VAE, generation head) is part of the model: keep it tiny too
        vq_config=dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
                       num_res_blocks=1, num_patches=4, projection_dim=32, image_token_embed_dim=32),
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"), tie_word_embeddings=False,
    )
    image_processor = JanusImageProcessorPil(size={"height": 32, "width": 32}, min_size=8,
                                             image_mean=MEAN, image_std=MEAN)
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
                               chat_template=chat_template("<image_placeholder>"))
    return config, processor


def _internvl() -> tuple[Any, Any]:
    from transformers import InternVLConfig, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = family_tokenizer(
        "<IMG_CONTEXT>", ("<img>", "</img>", "<video>"),
        {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"},
    )
    config = InternVLConfig(
        text_config=_text(tokenizer, model_type="qwen2"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=[32, 32], patch_size=[8, 8]),
        downsample_ratio=0.5, vision_feature_layer=-1,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
    )
    # tiles of 32 px, 1 to 4 per image (plus a thumbnail): images of one batch differ in tile count
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4,
        image_mean=MEAN, image_std=MEAN,
    )
    with video_slot_may_be_empty():
        processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                      image_seq_length=4, chat_template=chat_template("<IMG_CONTEXT>"))
    return config, processor


class PixtralStandIn:
    """What ``PixtralProcessor`` does for images, for an environment without torchvision.

    transformers' ``PixtralProcessor`` cannot be imported without torchvision; this does the
    same with the PIL image processor: resize to multiples of ``patch * merge``, then write
    each image as rows of ``[IMG]`` tokens ended by ``[IMG_BREAK]`` (the last by ``[IMG_END]``).
    """

    def __init__(self, image_processor: Any, tokenizer: Any, patch_size: int, spatial_merge_size: int,
                 chat_template: str) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.unit = patch_size * spatial_merge_size
        self.chat_template = chat_template

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def __call__(self, images: Any, text: list[str], return_tensors: str = "pt", padding: bool = True) -> Any:
        from transformers import BatchFeature

        pixels = self.image_processor(images, patch_size=self.unit, return_tensors=return_tensors)
        prompts = []
        for prompt, (height, width) in zip(text, pixels["image_sizes"].tolist()):
            rows = ["[IMG]" * (int(width) // self.unit) + "[IMG_BREAK]"] * (int(height) // self.unit)
            rows[-1] = rows[-1][: -len("[IMG_BREAK]")] + "[IMG_END]"
            prompts.append(prompt.replace("[IMG]", "".join(rows), 1))
        encoded = self.tokenizer(prompts, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**encoded, **pixels})


def _mistral3() -> tuple[Any, Any]:
    from transformers import Mistral3Config
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = family_tokenizer("[IMG]", ("[IMG_BREAK]", "[IMG_END]"))
    config = Mistral3Config(
        text_config=_text(tokenizer, model_type="mistral", head_dim=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=48, patch_size=8, head_dim=8),
        spatial_merge_size=2, vision_feature_layer=-1, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )
    # images keep their aspect ratio (longest edge 48): one batch mixes different patch counts
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 48}, patch_size=8, image_mean=MEAN, image_std=MEAN)
    processor = PixtralStandIn(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               spatial_merge_size=2, chat_template=chat_template("[IMG]"))
    return config, processor


def _aya_vision() -> tuple[Any, Any]:
    from transformers import AyaVisionConfig, AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tiles = tuple(f"TILE_{i}" for i in range(1, 13))
    tokenizer = family_tokenizer(
        "<image>", ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE_GLOBAL", *tiles)
    )
    config = AyaVisionConfig(
        text_config=_text(tokenizer, model_type="cohere2", head_dim=8, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"]),
        vision_config=_siglip(),
        downsample_factor=2, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4,
        image_mean=MEAN, image_std=MEAN,
    )
    processor = AyaVisionProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   img_size=32, downsample_factor=2, chat_template=chat_template("<image>"))
    return config, processor


def _blip_2(instruct: bool = False) -> tuple[Any, Any]:
    from transformers import Blip2Config, Blip2Processor, InstructBlipConfig, InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = family_tokenizer("<image>", register=False)
    text = dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   encoder_hidden_size=32, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = (InstructBlipConfig if instruct else Blip2Config)(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=qformer,
        text_config=text, num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=MEAN)
    if instruct:
        # the Q-Former reads the prompt too (BERT-style absolute positions: padded on the right)
        qformer_tokenizer = family_tokenizer("<image>", register=False)
        qformer_tokenizer.padding_side = "right"
        processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          qformer_tokenizer=qformer_tokenizer, num_query_tokens=4)
    else:
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4)
    # the processor puts the query tokens in front of the prompt itself: no placeholder
    processor.chat_template = chat_template("")
    return config, processor


def _mllama() -> tuple[Any, Any]:
    from transformers import MllamaConfig, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = family_tokenizer("<|image|>", ("<|python_tag|>",))
    # tiles of 32 px, up to 4 per image (the aspect-ratio ids index the processor's list for 4
    # tiles, so the config keeps its default list); 16 patches + a class token per tile, padded
    # to 24 inside the encoder; the projector reads the global output and local blocks 0 and 1
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=4, image_size=32, patch_size=8, max_num_tiles=4,
                  intermediate_layers_indices=[0, 1], vision_output_dim=96,
                  supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
    # layers 1 and 3 are gated cross-attention layers: the only way the text reads the image
    text = _text(tokenizer, num_hidden_layers=4, cross_attention_layers=[1, 3],
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = MllamaConfig(text_config=text, vision_config=vision,
                          image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4,
                                              image_mean=MEAN, image_std=MEAN)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=chat_template("<|image|>"))
    return config, processor


def _open_gates(model: Any) -> None:
    """Mllama initialises its tanh gates at zero: the cross-attention layers, the global vision
    layers and the tile embeddings would then pass nothing. A trained model has them open."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", "gate_attn", "gate_ffn")) or (
                "vision_model" in name and name.endswith("embedding.gate")
            ):
                param.fill_(1.0)


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen2_vl": lambda: _qwen("qwen2_vl"),
    "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"),
    "qwen3_vl": lambda: _qwen("qwen3_vl"),
    "glm4v": _glm4v,
    "gemma3": _gemma3,
    "paligemma": _paligemma,
    "idefics2": _idefics2,
    "idefics3": _idefics3,
    "smolvlm": lambda: _idefics3(smol=True),
    "internvl": _internvl,
    "deepseek_vl": _deepseek_vl,
    "janus": _janus,
    "llava_onevision": _llava_onevision,
    "aya_vision": _aya_vision,
    "blip-2": _blip_2,
    "instructblip": lambda: _blip_2(instruct=True),
    "mistral3": _mistral3,
    "mllama": _mllama,
}

#: what a family's random init needs to behave like a trained model
AFTER_INIT: dict[str, Callable[[Any], None]] = {"mllama": _open_gates}

FAMILIES = tuple(BUILDERS)

#: families whose processor is saved and loads back through ``--mllm-model`` in this environment
#: (no torchvision): AutoProcessor, or for a processor with a video slot the same parts without it
AUTO_PROCESSOR_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f not in ("mistral3", "smolvlm"))
# The other two are tested with the processor built in memory: PixtralProcessor (mistral3) needs
# torchvision (PixtralStandIn does its work); SmolVLMProcessor needs num2words (Idefics3Processor
# stands in).


def tiny_family(family: str, *, seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised tiny model of ``family`` and its processor (eval mode)."""
    import torch
    from transformers import AutoModelForImageTextToText

    config, processor = BUILDERS[family]()
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    if family in AFTER_INIT:
        AFTER_INIT[family](model)
    model.eval()
    return model, processor
