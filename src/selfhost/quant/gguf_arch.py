"""What llama.cpp expects of each architecture we export, and the checks that a model fits it.

llama.cpp hard-codes some behaviour per architecture that Hugging Face keeps
in config.json (which layers slide, the local rope base, the attention scale).
Where the two can disagree, the export either folds the difference into the
weights (the attention scale) or refuses with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from selfhost.errors import UnsupportedModelError
from selfhost.layers.rotary import RopeSpec
from selfhost.models.spec import ModelSpec


def _head_dim_scale(spec: ModelSpec) -> float:
    return spec.head_dim**-0.5


def _gemma_scale(layers_of_27b: int) -> Callable[[ModelSpec], float]:
    """llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim), except for the 27B
    (recognised by its layer count), where it uses 1/sqrt(hidden // heads)."""

    def scale(spec: ModelSpec) -> float:
        if spec.num_layers == layers_of_27b:
            return (spec.hidden_size // spec.num_heads) ** -0.5
        return spec.head_dim**-0.5

    return scale


@dataclass(frozen=True)
class GGUFExperts:
    """What llama.cpp's graph fixes about an architecture's sparse MLPs: every layer is sparse,
    routing is a softmax over the router's logits with the top k kept, experts use SiLU, and:"""

    renormalizes: bool  # the kept weights are rescaled to sum to one (always or never, per architecture)
    shared_expert: bool = False  # each layer also runs a sigmoid-gated shared expert, which must be present
    width_key: bool = True  # the experts' width is expert_feed_forward_length (else feed_forward_length)


@dataclass(frozen=True)
class GGUFArch:
    name: str  # llama.cpp architecture
    interleave_qk: bool = False  # llama.cpp rotates adjacent pairs (its "llama" rope) instead of halves
    fused_projections: bool = False  # attn_qkv, and ffn_up holding gate then up (Phi-3)
    output_must_be_tied: bool = False  # llama.cpp reads the output head from token_embd
    # Sliding-window layers: llama.cpp fixes the pattern per architecture (layer i slides when
    # i % pattern < pattern - 1); None = no sliding layers allowed.
    swa_pattern: int | None = None
    window_ignored: bool = False  # llama.cpp loads the window but attends globally (Phi-3, for now)
    softcaps: tuple[str, ...] = ()  # which soft-caps the architecture applies: "attn", "final"
    softcaps_required: bool = False  # applied with built-in defaults when the keys are absent
    local_rope_theta: float | None = None  # llama.cpp's fixed rope base of sliding layers
    attn_scale: Callable[[ModelSpec], float] = _head_dim_scale  # what llama.cpp multiplies queries by
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")
    experts: GGUFExperts | None = None  # None: dense MLPs
    output_required: bool = False  # llama.cpp will not fall back to token_embd for a missing output head


# Our architectures -> llama.cpp's.
GGUF_ARCHES: dict[str, GGUFArch] = {
    "LlamaForCausalLM": GGUFArch("llama", interleave_qk=True),
    "MistralForCausalLM": GGUFArch("llama", interleave_qk=True),
    "Qwen2ForCausalLM": GGUFArch("qwen2"),
    "Qwen3ForCausalLM": GGUFArch("qwen3"),
    "GemmaForCausalLM": GGUFArch("gemma", output_must_be_tied=True),
    "Gemma2ForCausalLM": GGUFArch("gemma2", output_must_be_tied=True, swa_pattern=2, softcaps=("attn", "final"),
                                  softcaps_required=True, attn_scale=_gemma_scale(46)),
    "Gemma3ForCausalLM": GGUFArch("gemma3", swa_pattern=6, softcaps=("final",), local_rope_theta=10_000.0,
                                  attn_scale=_gemma_scale(62)),
    "Phi3ForCausalLM": GGUFArch("phi3", fused_projections=True, window_ignored=True,
                                rope_types=("default", "longrope")),
    # llama.cpp runs Mixtral as its "llama" architecture with expert tensors and keys.
    "MixtralForCausalLM": GGUFArch("llama", interleave_qk=True,
                                   experts=GGUFExperts(renormalizes=True, width_key=False)),
    "Qwen2MoeForCausalLM": GGUFArch("qwen2moe", output_required=True,
                                    experts=GGUFExperts(renormalizes=False, shared_expert=True)),
    "Qwen3MoeForCausalLM": GGUFArch("qwen3moe", experts=GGUFExperts(renormalizes=True)),
}

# Architectures selfhost runs but does not export yet, and why.
NOT_EXPORTED: dict[str, str] = {
    **dict.fromkeys(("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"),
                    "its latent attention and grouped routing are not mapped onto llama.cpp's deepseek2 tensors"),
    "GptOssForCausalLM": "its attention sinks, clamped SwiGLU and MXFP4 experts are not mapped onto llama.cpp's "
                         "gpt-oss tensors",
}


def sliding_window(spec: ModelSpec) -> int | None:
    """The window of the model's sliding layers (None if every layer attends globally)."""
    windows = {w for w in spec.layer_windows if w is not None and w < spec.max_position}
    if len(windows) > 1:
        raise UnsupportedModelError(f"layers use different sliding windows {sorted(windows)}; GGUF holds one")
    return windows.pop() if windows else None


def global_rope(spec: ModelSpec) -> RopeSpec:
    """The rope of the globally attending layers (the one GGUF's rope keys describe)."""
    for window, rope in zip(spec.layer_windows, spec.layer_rope):
        if window is None or window >= spec.max_position:
            return spec.ropes[rope]
    return spec.ropes[spec.layer_rope[0]]


def check_supported(spec: ModelSpec) -> GGUFArch:
    """The llama.cpp architecture for `spec`; raises UnsupportedModelError naming what does not fit."""
    arch = GGUF_ARCHES.get(spec.architecture)
    if arch is None:
        why = f" ({NOT_EXPORTED[spec.architecture]})" if spec.architecture in NOT_EXPORTED else ""
        raise UnsupportedModelError(f"GGUF export of {spec.architecture} is not supported yet{why}; "
                                    f"supported: {', '.join(GGUF_ARCHES)}")
    if arch.output_must_be_tied and not spec.tie_embeddings:
        raise UnsupportedModelError(f"{spec.architecture} with an untied output head cannot be exported: llama.cpp's "
                                    f"{arch.name} reads the output head from the token embeddings")
    _check_windows(spec, arch)
    _check_softcaps(spec, arch)
    _check_ropes(spec, arch)
    _check_experts(spec, arch)
    return arch


def _check_windows(spec: ModelSpec, arch: GGUFArch) -> None:
    window = sliding_window(spec)
    if window is None or arch.window_ignored:
        return
    if arch.swa_pattern is None:
        raise UnsupportedModelError(
            f"{spec.architecture} with sliding-window attention cannot be exported: llama.cpp's "
            f"{arch.name} architecture attends globally"
        )
    p = arch.swa_pattern
    sliding = [w is not None and w < spec.max_position for w in spec.layer_windows]
    expected = [i % p < p - 1 for i in range(spec.num_layers)]
    if sliding != expected:
        layers = [i for i, s in enumerate(sliding) if s]
        raise UnsupportedModelError(
            f"{spec.architecture}: sliding layers {layers} differ from llama.cpp's fixed {arch.name} pattern "
            f"(every layer but each {p}th)"
        )


def _check_softcaps(spec: ModelSpec, arch: GGUFArch) -> None:
    caps = {"attn": spec.attn_softcap, "final": spec.final_softcap}
    for kind, value in caps.items():
        if value is not None and kind not in arch.softcaps:
            raise UnsupportedModelError(f"{spec.architecture} with {kind} logit soft-capping cannot be exported: "
                                        f"llama.cpp's {arch.name} does not apply it")
        if value is None and kind in arch.softcaps and arch.softcaps_required:
            raise UnsupportedModelError(f"{spec.architecture} without {kind} logit soft-capping cannot be exported: "
                                        f"llama.cpp's {arch.name} always applies it")


def _check_ropes(spec: ModelSpec, arch: GGUFArch) -> None:
    rope = global_rope(spec)
    if rope.rope_type not in arch.rope_types or rope.rotary_dim != spec.head_dim:
        raise UnsupportedModelError(f"rope {rope.rope_type!r} (rotary dim {rope.rotary_dim}) cannot be exported to "
                                    f"llama.cpp's {arch.name}; supported: {', '.join(arch.rope_types)}")
    for i, (window, index) in enumerate(zip(spec.layer_windows, spec.layer_rope)):
        layer_rope = spec.ropes[index]
        if arch.local_rope_theta is not None and window is not None and window < spec.max_position:
            fits = (layer_rope.rope_type == "default" and layer_rope.theta == arch.local_rope_theta
                    and layer_rope.rotary_dim == spec.head_dim)
            rule = f"fixes the sliding layers' rope at base {arch.local_rope_theta:g}, unscaled"
        else:
            fits, rule = layer_rope == rope, "uses one rope for these layers"
        if not fits:
            raise UnsupportedModelError(f"{spec.architecture}: layer {i} uses rope {layer_rope.rope_type!r} with base "
                                        f"{layer_rope.theta:g}; llama.cpp's {arch.name} {rule}")


def _check_experts(spec: ModelSpec, arch: GGUFArch) -> None:
    moe = arch.experts
    if moe is None:
        assert spec.num_experts == 0, spec.architecture  # every MoE architecture we export declares its experts
        return
    dense = [i for i in range(spec.num_layers) if not spec.is_moe_layer(i)]
    if dense:
        raise UnsupportedModelError(f"{spec.architecture}: layers {dense} have dense MLPs (decoder_sparse_step / "
                                    f"mlp_only_layers); llama.cpp's {arch.name} expects experts in every layer")
    if spec.normalize_top_k != moe.renormalizes:
        raise UnsupportedModelError(
            f"{spec.architecture} with norm_topk_prob={spec.normalize_top_k} cannot be exported: llama.cpp's "
            f"{arch.name} {'always' if moe.renormalizes else 'never'} renormalises the chosen experts' weights"
        )
    shared = spec.shared_expert_size > 0
    if shared != moe.shared_expert or (shared and not spec.shared_expert_gated):
        have = ("a gated" if spec.shared_expert_gated else "an ungated") if shared else "no"
        raise UnsupportedModelError(
            f"{spec.architecture} with {have} shared expert cannot be exported: llama.cpp's {arch.name} "
            f"{'needs one, sigmoid-gated' if moe.shared_expert else 'has none'}"
        )
    routing = (spec.routing, spec.routed_scaling_factor, spec.activation, spec.router_bias, spec.expert_bias)
    if routing != ("softmax_top_k", 1.0, "silu", False, False):
        raise UnsupportedModelError(
            f"{spec.architecture}: routing {spec.routing!r} (scale {spec.routed_scaling_factor}, activation "
            f"{spec.activation!r}, biases {spec.router_bias}/{spec.expert_bias}) differs from llama.cpp's "
            f"{arch.name}: softmax top-k, SiLU experts, no biases"
        )
