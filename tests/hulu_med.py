"""A tiny Hulu-Med look-alike: a checkpoint folder with its own code, loaded like the real one.

It mimics ``ZJU-AI4H/Hulu-Med-7B`` (VideoLLaMA3 lineage, Qwen2 backbone): the same code files
(``configuration_hulumed_{encoder,qwen2}.py``, ``modeling_hulumed_{encoder,qwen2}.py``,
``image_processing_hulumed.py``, ``processing_hulumed.py``, importing each other relatively), the
same ``auto_map`` entries (AutoConfig, AutoModelForCausalLM; AutoProcessor, AutoImageProcessor),
class names and module tree: ``model`` is a ``Qwen2Model`` that also holds ``vision_encoder``
(a NaViT-style encoder whose layers take and return 2-D ``[patches of all images, D]``, attention
block-diagonal per frame, 2-D rotary, merge inside the encoder) and ``mm_projector.readout``
(Linear, GELU, Linear); ``lm_head`` on top. Like the real model, ``forward`` writes the projected
features into the ``<image>`` positions, ``use_token_compression`` (on) refuses batches of more
than one sequence with images, and ``generate`` builds ``inputs_embeds`` and returns ONLY the new
tokens. Like the real processor it handles one prompt (a ``str``) per call: ``padding`` is
dropped, and a list of texts (even of one) with images raises AttributeError ('list' object has
no attribute 'replace'), as the real ``process_text`` does.

Simplified: images are resized to a fixed 16x16 (patch 4, so 16 patches; merge size 1 as for
real still images); no videos, 3-D volumes, ``conversation=`` mode (which loads files), labels or
``<think>`` stripping; the merge
is a mean over m x m patches (the real bilinear resize gives the same for m = 2); the vision
encoder config is not registered with ``AutoConfig``; the tokenizer is the demo's word-level
one (with a ``<s>`` prepended) plus ChatML markers; the weights are random.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import itertools
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENCODER_CONFIG = '''
from transformers import PreTrainedConfig

class HulumedVisionEncoderConfig(PreTrainedConfig):
    model_type = "hulumed_tiny_vision_encoder"
    def __init__(self, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_channels=3, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                 attention_dropout=0.0, **kwargs):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_channels, self.patch_size, self.hidden_act = num_channels, patch_size, hidden_act
        self.layer_norm_eps, self.attention_dropout = layer_norm_eps, attention_dropout
        super().__init__(**kwargs)
'''

QWEN2_CONFIG = '''
from transformers import Qwen2Config

from .configuration_hulumed_encoder import HulumedVisionEncoderConfig

class HulumedQwen2Config(Qwen2Config):
    model_type = "hulumed_tiny_qwen2"
    sub_configs = {"vision_encoder_config": HulumedVisionEncoderConfig}
    def __init__(self, vision_encoder=None, vision_encoder_config=None, mm_projector_type="mlp2x_gelu",
                 use_token_compression=True, image_token_index=-1, **kwargs):
        if not isinstance(vision_encoder_config, HulumedVisionEncoderConfig):
            vision_encoder_config = HulumedVisionEncoderConfig(**(vision_encoder_config or {}))
        self.vision_encoder, self.vision_encoder_config = vision_encoder, vision_encoder_config
        self.mm_projector_type, self.use_token_compression = mm_projector_type, use_token_compression
        self.image_token_index = image_token_index
        super().__init__(**kwargs)
'''

ENCODER_MODELING = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .configuration_hulumed_encoder import HulumedVisionEncoderConfig

def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)

class VisionRotaryEmbedding(nn.Module):
    """(row, column) angles per patch, in the image processor's merge-block order."""
    def __init__(self, dim, theta=10000.0):
        super().__init__()
        self.dim, self.theta = dim, theta
    def forward(self, grid_sizes, merge_sizes):
        positions = []
        for (t, h, w), m in zip(grid_sizes.tolist(), merge_sizes.tolist()):
            rows = torch.arange(h).view(h // m, 1, m, 1).expand(h // m, w // m, m, m).flatten()
            cols = torch.arange(w).view(1, w // m, 1, m).expand(h // m, w // m, m, m).flatten()
            positions.append(torch.stack([rows, cols], -1).repeat(t, 1))
        positions = torch.cat(positions).to(grid_sizes.device).float()
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.dim, 2, device=positions.device).float() / self.dim)
        angles = (positions[..., None] * inv_freq).flatten(1)
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

class HulumedVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
    def forward(self, pixel_values):
        p = self.config.patch_size
        patches = pixel_values.view(-1, self.config.num_channels, p, p)
        return self.patch_embedding(patches).view(-1, self.config.hidden_size)

class HulumedVisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
    def forward(self, hidden_states, attention_mask, cos, sin):
        n = hidden_states.shape[0]
        q, k, v = (proj(hidden_states).view(n, self.heads, self.head_dim).transpose(0, 1)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.out_proj(out.transpose(0, 1).reshape(n, -1))

class HulumedVisionMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

class HulumedVisionEncoderLayer(nn.Module):
    """Pre-LN block on a 2-D [patches of all images, D] tensor; returns a bare tensor."""
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = HulumedVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HulumedVisionMLP(config)
    def forward(self, hidden_states, attention_mask, cos, sin):
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask, cos, sin)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))

class HulumedVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(HulumedVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.rotary_pos_emb = VisionRotaryEmbedding(config.hidden_size // config.num_attention_heads // 2)
    def forward(self, hidden_states, grid_sizes, merge_sizes):
        cos, sin = self.rotary_pos_emb(grid_sizes, merge_sizes)
        frame_sizes = (grid_sizes[:, 1] * grid_sizes[:, 2]).repeat_interleave(grid_sizes[:, 0])
        frame = torch.arange(len(frame_sizes), device=hidden_states.device).repeat_interleave(frame_sizes)
        mask = frame[:, None] == frame[None, :]  # block-diagonal: a patch sees its own frame only
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, cos.to(hidden_states.dtype), sin.to(hidden_states.dtype))
        return hidden_states

class HulumedVisionEncoderModel(PreTrainedModel):
    config_class = HulumedVisionEncoderConfig
    base_model_prefix = "hulumed"
    _no_split_modules = ["HulumedVisionEncoderLayer"]
    def __init__(self, config):
        super().__init__(config)
        self.embeddings = HulumedVisionEmbeddings(config)
        self.encoder = HulumedVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()
    def forward(self, pixel_values, grid_sizes, merge_sizes):
        hidden = self.embeddings(pixel_values.to(self.dtype))
        hidden = self.post_layernorm(self.encoder(hidden, grid_sizes, merge_sizes))
        merged = []  # patches come in (t, h/m, w/m, m, m) order: each run of m*m rows is one block
        for part, m in zip(hidden.split(grid_sizes.prod(1).tolist()), merge_sizes.tolist()):
            merged.append(part.view(-1, m * m, part.shape[-1]).mean(1))
        return torch.cat(merged)  # [sum t*(h/m)*(w/m), D]
'''

QWEN2_MODELING = '''
import torch
from torch import nn
from transformers import Qwen2ForCausalLM, Qwen2Model

from .configuration_hulumed_qwen2 import HulumedQwen2Config
from .modeling_hulumed_encoder import HulumedVisionEncoderModel

class MlpGeluProjector(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.readout = nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(),
                                     nn.Linear(out_features, out_features))
    def forward(self, x):
        return self.readout(x)

class HulumedQwen2Model(Qwen2Model):
    config_class = HulumedQwen2Config
    def __init__(self, config):
        super().__init__(config)
        self.vision_encoder = HulumedVisionEncoderModel(config.vision_encoder_config)
        width = config.vision_encoder_config.hidden_size
        self.mm_projector = (nn.Linear(width, config.hidden_size) if config.mm_projector_type == "linear"
                             else MlpGeluProjector(width, config.hidden_size))
        self.post_init()

class HulumedQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = HulumedQwen2Config
    def __init__(self, config):
        super(Qwen2ForCausalLM, self).__init__(config)
        self.model = HulumedQwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
    def get_model(self):
        return self.model
    def get_vision_encoder(self):
        return self.model.vision_encoder
    def get_mm_projector(self):
        return self.model.mm_projector
    def embed_multimodal(self, input_ids, pixel_values=None, grid_sizes=None, merge_sizes=None, modals=None):
        embeds = self.model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        if modals is None or grid_sizes is None or merge_sizes is None:
            raise ValueError("pixel_values need grid_sizes, merge_sizes and modals (one of 'image'/'video'/'text' "
                             "per visual), as the processor returns them")
        if self.config.use_token_compression and input_ids.shape[0] != 1:
            raise ValueError(f"use_token_compression supports one sequence per batch, got {input_ids.shape[0]}")
        features = self.model.mm_projector(self.model.vision_encoder(pixel_values, grid_sizes, merge_sizes))
        counts = (grid_sizes.prod(1) // merge_sizes**2).tolist()
        kept = [f for f, modal in zip(features.split(counts), modals) if modal != "text"]
        features = torch.cat(kept) if kept else features[:0]
        mask = input_ids == self.config.image_token_index
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"the input holds {int(mask.sum())} image tokens (id {self.config.image_token_index}) "
                             f"but the images give {features.shape[0]} features")
        return embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype))
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None, grid_sizes=None,
                merge_sizes=None, modals=None, use_cache=None, logits_to_keep=0, inputs_embeds=None, **kwargs):
        if inputs_embeds is None and pixel_values is not None and input_ids.shape[1] > 1:
            inputs_embeds = self.embed_multimodal(input_ids, pixel_values, grid_sizes, merge_sizes, modals)
            input_ids = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep,
                               **kwargs)
    @torch.no_grad()
    def generate(self, pixel_values=None, grid_sizes=None, merge_sizes=None, modals=None, **kwargs):
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("`inputs_embeds` is not supported")
        input_ids = kwargs.pop("input_ids")
        embeds = self.embed_multimodal(input_ids, pixel_values, grid_sizes, merge_sizes, modals)
        return super().generate(inputs_embeds=embeds, **kwargs)  # the output holds the new tokens only
'''

IMAGE_PROCESSING = '''
import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import to_pil_image

class HulumedImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "grid_sizes", "merge_sizes"]
    def __init__(self, image_size=16, patch_size=4, merge_size=1, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 255, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.patch_size, self.merge_size = image_size, patch_size, merge_size
        self.image_mean, self.image_std, self.rescale_factor = list(image_mean), list(image_std), rescale_factor
    def _to_pixels(self, image):
        """PIL, HWC/CHW array or tensor -> resized (bicubic), rescaled, normalised float [C, S, S]."""
        image = (image if isinstance(image, Image.Image) else to_pil_image(image)).convert("RGB")
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * self.rescale_factor
        mean, std = np.array(self.image_mean, np.float32), np.array(self.image_std, np.float32)
        return (pixels - mean[:, None, None]) / std[:, None, None]
    def preprocess(self, images, merge_size=None, return_tensors=None, **kwargs):
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        merge_size = self.merge_size if merge_size is None else merge_size
        merges = list(merge_size) if isinstance(merge_size, (list, tuple)) else [merge_size] * len(images)
        p, patches, grids = self.patch_size, [], []
        for image, m in zip(images, merges):
            pixels = torch.from_numpy(self._to_pixels(image))
            c, h, w = pixels.shape[0], self.image_size // p, self.image_size // p
            blocks = pixels.view(1, c, h // m, m, p, w // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
            patches.append(blocks.reshape(h * w, c * p * p))
            grids.append([1, h, w])
        data = {"pixel_values": torch.cat(patches), "grid_sizes": torch.tensor(grids),
                "merge_sizes": torch.tensor(merges)}
        return BatchFeature(data=data, tensor_type=return_tensors)
    def __call__(self, images, **kwargs):
        return self.preprocess(images, **kwargs)
'''

PROCESSING = '''
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

DEFAULT_IMAGE_TOKEN = "<image>"

class HulumedProcessor(ProcessorMixin):
    """One prompt (a str) per call; each <image> becomes t*(h/m)*(w/m) <image> tokens."""
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_merge_size=1,
                 video_merge_size=2, fps=1, max_frames=128):
        self.image_merge_size, self.video_merge_size = image_merge_size, video_merge_size
        self.fps, self.max_frames = fps, max_frames
        if chat_template is None:
            chat_template = tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    def process_images(self, images, merge_size=None, return_tensors=None):
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        merge = [self.image_merge_size] * len(images) if merge_size is None else merge_size
        inputs = self.image_processor(images=images, merge_size=merge, return_tensors=return_tensors)
        inputs["modals"] = ["image"] * len(images)
        return inputs
    def process_text(self, text, image_inputs, **kwargs):
        kwargs.pop("padding", None)  # as in Hulu-Med: no padding, so one prompt per call
        kwargs.pop("padding_side", None)
        counts = []
        for (t, h, w), m in zip(image_inputs.get("grid_sizes", []).tolist() if image_inputs else [],
                                image_inputs.get("merge_sizes", []).tolist() if image_inputs else []):
            counts += [(h // m) * (w // m)] * t
        if counts:
            used = 0
            while DEFAULT_IMAGE_TOKEN in text:  # a list of texts never matches here...
                text = text.replace(DEFAULT_IMAGE_TOKEN, "<placeholder>" * counts[used], 1)
                used += 1
            text = text.replace("<placeholder>", DEFAULT_IMAGE_TOKEN)  # ...and fails here, as in Hulu-Med
            if used != len(counts):
                raise AssertionError("Number of images does not match the number of image tokens in the text.")
        return self.tokenizer(text, **kwargs)
    def __call__(self, text=None, conversation=None, images=None, return_labels=False, **kwargs):
        if conversation is not None or return_labels or text is None:
            raise ValueError("this look-alike takes text= (one str) and images=, no conversation= or labels")
        image_inputs = {}
        if images is not None:
            image_inputs = self.process_images(images, kwargs.pop("merge_size", None), kwargs.get("return_tensors"))
        text_inputs = self.process_text(text, image_inputs, **kwargs)
        return BatchFeature(data={**text_inputs, **image_inputs})
'''

FILES = {
    "configuration_hulumed_encoder": ENCODER_CONFIG,
    "configuration_hulumed_qwen2": QWEN2_CONFIG,
    "modeling_hulumed_encoder": ENCODER_MODELING,
    "modeling_hulumed_qwen2": QWEN2_MODELING,
    "image_processing_hulumed": IMAGE_PROCESSING,
    "processing_hulumed": PROCESSING,
}

MODEL_AUTO_MAP = {"AutoConfig": "configuration_hulumed_qwen2.HulumedQwen2Config",
                  "AutoModelForCausalLM": "modeling_hulumed_qwen2.HulumedQwen2ForCausalLM"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_hulumed.HulumedProcessor",
                      "AutoImageProcessor": "image_processing_hulumed.HulumedImageProcessor"}

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML as in the VideoLLaMA3 family: an image item renders as ``<image>`` and a newline."""

_imports = itertools.count()


def _import_code(path: Path) -> Any:
    """Import the written files as one package (relative imports resolve as in the modules cache)."""
    name = f"_hulu_med_tiny_{next(_imports)}"
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    sys.modules[name] = importlib.util.module_from_spec(spec)
    for module in FILES:
        importlib.import_module(f"{name}.{module}")
    return sys.modules[name]


def save_hulu_med(path: Path, seed: int = 0, *, extra_words: Iterable[str] = (), image_merge_size: int = 1) -> Path:
    """Write code files, random weights (after ``torch.manual_seed(seed)``) and processor into ``path``.

    ``image_merge_size`` 2 averages 2x2 patches (4 image tokens per image instead of 16).
    """
    import torch

    from pytest_mllmprobe.demo.tiny import IMAGE_TOKEN, SPECIAL_TOKENS, build_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for module, text in FILES.items():
        (path / f"{module}.py").write_text(text.lstrip())
    code = _import_code(path)
    tokenizer = build_tokenizer(extra_words, specials=(*SPECIAL_TOKENS, "<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = CHAT_TEMPLATE
    config = code.configuration_hulumed_qwen2.HulumedQwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_encoder_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                               "num_attention_heads": 4, "patch_size": 4},
    )
    config.auto_map = dict(MODEL_AUTO_MAP)
    torch.manual_seed(seed)
    model = code.modeling_hulumed_qwen2.HulumedQwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    image_processor = code.image_processing_hulumed.HulumedImageProcessor(image_size=16, patch_size=4)
    image_processor.auto_map = dict(PROCESSOR_AUTO_MAP)
    processor = code.processing_hulumed.HulumedProcessor(
        image_processor, tokenizer, chat_template=CHAT_TEMPLATE, image_merge_size=image_merge_size
    )
    processor.auto_map = dict(PROCESSOR_AUTO_MAP)
    processor.save_pretrained(path)  # processor_config.json (image processor nested), tokenizer, chat template
    image_processor.save_pretrained(path)  # preprocessor_config.json, as 4.x hub checkpoints also hold
    return path


def expected_modules() -> dict[str, str]:
    return {"vision": "model.vision_encoder.encoder.layers", "connector": "model.mm_projector",
            "llm": "model.layers"}


def smoke(path: Path) -> dict[str, Any]:
    """Load ``path`` through the Auto classes, run one image + prompt forward and a 3-token generate."""
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is shown ?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert prompt.count("<image>") == 1, prompt
    inputs = processor(images=[Image.new("RGB", (20, 28), (200, 30, 90))], text=prompt, return_tensors="pt")
    tokens = int((inputs["input_ids"] == config.image_token_index).sum())
    assert tokens == int((inputs["grid_sizes"].prod(1) // inputs["merge_sizes"] ** 2).sum()), inputs
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], config.vocab_size), logits.shape
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 3, out.shape  # new tokens only, as Hulu-Med's generate
    return {"prompt": prompt, "image_tokens": tokens, "logits": tuple(logits.shape), "generated": out.tolist()}


__all__ = ["save_hulu_med", "smoke", "expected_modules", "CHAT_TEMPLATE", "FILES"]
