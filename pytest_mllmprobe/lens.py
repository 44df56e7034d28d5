"""The closed-set logit lens: the class each decoder layer's last token would say.

A decoder layer's last-token state (the pooled ``llm.<i>.last`` rows extraction already
holds) is read through the model's final norm and the LM-head rows of the class names' first
tokens, as the last layer's state is read when the model answers. The argmax over the class
names is the class the model "would say" at that layer; the softmax over them gives the
class scores AUROC needs. Loci ``lens.<i>``.

What the lens needs from the model is taken once, while the model is loaded
(:func:`capture`): the ``K`` head rows (and head biases), the final norm's kind, weight, bias
and epsilon, and the logit soft-capping (Gemma 2) or scale (Cohere). It is kept with the
features in the cache, so a cache hit computes the lens with no model. The norm's kind is not
guessed from its class name: the module is run on a test vector and compared with the three
forms in use (RMSNorm, Gemma's ``(1 + weight)`` RMSNorm, LayerNorm).

The reconstruction is checked on every run (:func:`verify`): at the last decoder layer the lens
must give the model's own first-token logits of the class names (kept by the extraction
forward), up to a shift per image. A model whose logits are not ``head(norm(last layer))``
(an extra projection, a hook on the head, a norm this module does not know) gets no lens
loci, and the run says why (``answers.lens.note``) instead of reporting a wrong curve.

Nothing here imports torch at module level; :func:`capture` imports it when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: name prefix of the lens loci (``lens.0`` ... ``lens.<n-1>``)
PREFIX = "lens."
#: the readout recorded on lens loci: they sit at their LLM layer's x in the pipeline plot
READOUT = "lens"
#: relative error allowed between the lens at the last layer and the model's own class logits
#: (float32 is exact to ~1e-6; bfloat16 forwards round the stored rows and the model's norm)
TOLERANCE = {"float32": 1e-3, "other": 0.08}
NORM_KINDS = ("rms", "rms_plus_one", "layer", "none")
#: attribute names of the final norm on the module that holds the decoder layer list
NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f", "final_norm", "norm_f")


@dataclass(frozen=True)
class LensHead:
    """What the lens reads through: the final norm and the class names' head rows (float32)."""

    rows: np.ndarray                  # [K, D] LM-head rows of each class name's first token
    norm_kind: str                    # one of NORM_KINDS
    eps: float = 1e-6
    norm_weight: np.ndarray | None = None   # [D]
    norm_bias: np.ndarray | None = None     # [D]
    bias: np.ndarray | None = None          # [K] head biases, where the head has them
    softcap: float | None = None            # logits -> softcap * tanh(logits / softcap)
    scale: float | None = None              # logits -> scale * logits

    def meta(self) -> dict[str, Any]:
        """The scalars, JSON-able (the arrays go to the cache's ``.npz``)."""
        return {"norm_kind": self.norm_kind, "eps": self.eps, "softcap": self.softcap, "scale": self.scale}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"rows": self.rows}
        for name in ("norm_weight", "norm_bias", "bias"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> LensHead:
        if meta.get("norm_kind") not in NORM_KINDS or "rows" not in arrays:
            raise ValueError(f"lens head {meta!r} is not one this version reads")
        return cls(
            rows=arrays["rows"], norm_kind=meta["norm_kind"], eps=float(meta.get("eps") or 0.0),
            norm_weight=arrays.get("norm_weight"), norm_bias=arrays.get("norm_bias"), bias=arrays.get("bias"),
            softcap=meta.get("softcap"), scale=meta.get("scale"),
        )


# -- numpy: the lens itself -----------------------------------------------------------------------


def normalise(head: LensHead, x: np.ndarray) -> np.ndarray:
    """The final norm applied to rows ``x [N, D]`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    weight = None if head.norm_weight is None else head.norm_weight.astype(np.float64)
    if head.norm_kind == "none":
        return x
    if head.norm_kind == "layer":
        centred = x - x.mean(axis=1, keepdims=True)
        out = centred / np.sqrt((centred**2).mean(axis=1, keepdims=True) + head.eps)
        out = out if weight is None else out * weight
        return out if head.norm_bias is None else out + head.norm_bias.astype(np.float64)
    out = x / np.sqrt((x**2).mean(axis=1, keepdims=True) + head.eps)
    if weight is None:
        return out
    return out * (1.0 + weight) if head.norm_kind == "rms_plus_one" else out * weight


def logits(head: LensHead, x: np.ndarray) -> np.ndarray:
    """``[N, K]`` class-name logits of the rows ``x [N, D]`` read through the norm and the head."""
    out = normalise(head, x) @ head.rows.astype(np.float64).T
    if head.bias is not None:
        out = out + head.bias.astype(np.float64)
    if head.scale is not None:
        out = out * head.scale
    if head.softcap is not None:
        out = head.softcap * np.tanh(out / head.softcap)
    return out


def relative_error(head: LensHead, last_rows: np.ndarray, first_logits: np.ndarray) -> float:
    """The largest difference between the lens at the last layer and the model's own class
    logits, both shifted to mean 0 per image (the softmax over the vocabulary adds such a
    shift), relative to the largest of the model's own."""
    ours = logits(head, last_rows)
    theirs = np.asarray(first_logits, dtype=np.float64)
    if not (np.isfinite(ours).all() and np.isfinite(theirs).all()):
        return float("inf")
    ours = ours - ours.mean(axis=1, keepdims=True)
    theirs = theirs - theirs.mean(axis=1, keepdims=True)
    return float(np.abs(ours - theirs).max()) / max(float(np.abs(theirs).max()), 1e-6)


def verify(head: LensHead, last_rows: np.ndarray, first_logits: np.ndarray,
           dtype: str) -> tuple[LensHead | None, str | None]:
    """``(head, None)`` when the lens at the last layer gives the model's own class logits, else
    ``(None, why)``.

    The soft-capping and scale read from the config are candidates, not facts: whether a model
    class applies them differs (Gemma 3's image-text class does not apply its text config's
    soft-capping, PaliGemma's does), so the head is tried with and without each, and the one
    that reproduces the model's own logits is kept."""
    candidates = [head]
    for change in ({"softcap": None}, {"scale": None}, {"softcap": None, "scale": None}):
        if any(getattr(head, key) is not None for key in change):
            candidates.append(LensHead(**{**head.__dict__, **change}))
    allowed = TOLERANCE["float32"] if dtype == "float32" else TOLERANCE["other"]
    errors = [relative_error(c, last_rows, first_logits) for c in candidates]
    best = int(np.argmin(errors))
    if errors[best] <= allowed:
        return candidates[best], None
    return None, (f"the final norm and LM head read from the model do not reproduce its own logits at the last "
                  f"layer (relative error {errors[best]:.3g} > {allowed:g}): its answer is not head(norm(last "
                  "layer)) (an extra projection, a modified head, or a norm of another kind), so no lens is reported")


# -- torch: what the lens needs, taken from the loaded model --------------------------------------


def capture(model: Any, last_layer_path: str, first_ids: list[int]) -> tuple[LensHead | None, str | None]:
    """``(head, None)``, or ``(None, why)`` when the model's final norm or head cannot be read.

    ``last_layer_path`` is the last decoder layer (``model.language_model.layers.3``); the final
    norm is looked for on the module that holds the layer list. A model whose head or norm
    cannot be read this way gets no lens (the run goes on and says why), never an error."""
    try:
        return _capture(model, last_layer_path, first_ids)
    except Exception as exc:  # an unusual head or norm: no lens, and the reason
        return None, f"the final norm and LM head could not be read ({type(exc).__name__}: {exc}); no lens is reported"


def _capture(model: Any, last_layer_path: str, first_ids: list[int]) -> tuple[LensHead | None, str | None]:
    import torch

    if len(set(first_ids)) < len(first_ids):
        return None, ("two class names start with the same token: a first-token lens cannot tell them apart; "
                      "rename the classes so their first tokens differ")
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head_module, "weight", None)
    if weight is None:
        return None, "the model has no output embeddings (LM head) to read"
    with torch.no_grad():
        ids = torch.tensor(first_ids, device=weight.device)
        rows = weight.index_select(0, ids).float().cpu().numpy()
        bias = getattr(head_module, "bias", None)
        bias = None if bias is None else bias.index_select(0, ids).float().cpu().numpy()
    parts = last_layer_path.split(".")
    parent_path = ".".join(parts[:-2])
    try:
        parent = model.get_submodule(parent_path)
    except AttributeError:
        return None, f"cannot find the module {parent_path!r} that holds the decoder layers"
    norm = next((getattr(parent, n) for n in NORM_NAMES if isinstance(getattr(parent, n, None), torch.nn.Module)), None)
    if norm is None:
        return None, (f"no final norm found on {parent_path} (looked for {', '.join(NORM_NAMES)}); "
                      "the lens reads a layer through the model's final norm")
    found = _norm_kind(norm, rows.shape[1])
    if isinstance(found, str):
        return None, found
    kind, eps, norm_weight, norm_bias = found
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return LensHead(
        rows=rows, norm_kind=kind, eps=eps, norm_weight=norm_weight, norm_bias=norm_bias, bias=bias,
        softcap=float(softcap) if softcap else None,
        scale=float(scale) if isinstance(scale, (int, float)) and scale != 1 else None,
    ), None


def _norm_kind(norm: Any, width: int) -> tuple[str, float, Any, Any] | str:
    """The final norm's kind, found by running it on a test vector and comparing the known forms."""
    import torch

    params = dict(norm.named_parameters(recurse=False))
    weight = params.get("weight")
    bias = params.get("bias")
    eps = next((float(getattr(norm, n)) for n in ("variance_epsilon", "eps", "epsilon")
                if isinstance(getattr(norm, n, None), (int, float))), 1e-6)
    as_np = (lambda t: None if t is None else t.detach().float().cpu().numpy())
    norm_weight, norm_bias = as_np(weight), as_np(bias)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(4, width, generator=generator) * 3 + 0.5
    first = next(norm.parameters(), None)
    device, dtype = (first.device, first.dtype) if first is not None else ("cpu", torch.float32)
    with torch.no_grad():
        expected = norm(probe.to(device=device, dtype=dtype)).float().cpu().numpy()
    x = probe.numpy().astype(np.float64)
    allowed = 1e-3 if dtype == torch.float32 else 0.05
    kinds = ("layer",) if norm_bias is not None else ("rms", "rms_plus_one", "layer", "none")
    errors = {}
    for kind in kinds:
        head = LensHead(rows=np.zeros((1, width), np.float32), norm_kind=kind, eps=eps,
                        norm_weight=norm_weight, norm_bias=norm_bias)
        got = normalise(head, x)
        errors[kind] = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-6))
    best = min(errors, key=errors.get)
    if errors[best] > allowed:
        return (f"the final norm {type(norm).__name__} is none of RMSNorm, Gemma's (1 + weight) RMSNorm or "
                f"LayerNorm (closest: {best}, relative error {errors[best]:.3g}); no lens is reported")
    return best, eps, norm_weight, norm_bias
