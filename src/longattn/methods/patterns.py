"""Static patterns from the papers, registered by name: each entry builds a mask_mod from its knobs."""

from __future__ import annotations

from longattn import masks
from longattn.methods.registry import register

register("causal", "pattern", paper="Vaswani et al. 2017 (decoder masking)")(masks.causal)
register("sliding_window", "pattern", paper="Longformer (Beltagy et al. 2020), Mistral")(masks.sliding_window)
register("streaming", "pattern", paper="StreamingLLM (Xiao et al. 2023) / LM-Infinite Λ-shape")(masks.sinks)
register("dilated", "pattern", paper="LongNet (Ding et al. 2023); Longformer dilated window")(masks.dilated)
register("s2_strided", "pattern", paper="S2-Attention (Lin et al. 2024)")(masks.strided)
register("block_local", "pattern", paper="Blockwise / local attention (Qiu et al. 2019)")(masks.block_local)
register("global_tokens", "pattern", paper="Longformer / ETC global tokens")(masks.global_tokens)
register("bigbird", "pattern", paper="BigBird (Zaheer et al. 2020)")(masks.bigbird)
register("power", "pattern", paper="PowerAttention (Chen et al. 2025)")(masks.power)
register("longlora", "pattern", paper="LongLoRA shifted sparse attention (Chen et al. 2023)")(masks.longlora_shifted)
register("document", "pattern", paper="packed sequences / varlen (FlashAttention varlen)")(masks.document)
# "moa" is the searched prefill method (methods/prefill/moa.py); this entry takes the per-head windows directly.
register("moa_windows", "pattern", paper="MoA: Mixture of Sparse Attention (Fu et al. 2024) per-head windows")(
    masks.per_head_window)
register("neighborhood", "pattern", paper="NATTEN / Generalized Neighborhood Attention (Hassani et al.)")(
    masks.neighborhood)
register("radial", "pattern", paper="Radial Attention for video diffusion (Li et al. 2025)")(masks.radial)
