"""Qwen3-VL and Qwen3-VL-MoE: the Qwen2-VL layout (`model.model.visual`, its `merger`,
`<|image_pad|>` tokens), with 16-pixel patches and, in the MoE variant, sparse MoE blocks as
each decoder layer's `mlp`.

Unlike Qwen2-VL, Qwen3-VL also adds "deepstack" features — intermediate vision layers, each
through its own merger in `visual.deepstack_merger_list` — onto the image-token positions of
the first decoder layers. `projector()` is the final merger only; a method that removes
visual tokens before those layers have run must remove them from the deepstack inputs too.
"""

from __future__ import annotations

from edgelmm.models.qwen2_vl import Qwen2VLAdapter
from edgelmm.models.registry import register_adapter


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
