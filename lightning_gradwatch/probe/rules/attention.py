"""``nn.MultiheadAttention``: the fallback rule, owning ``out_proj`` too.

Its forward uses ``out_proj.weight`` directly (through ``F.multi_head_attention_forward``)
without calling ``out_proj``, so the attention module must own every parameter beneath it.
"""

from __future__ import annotations

from torch import nn

from ..registry import register_rule
from .fallback import FallbackRule


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(FallbackRule):
    recursive = True

    def batch_dim(self, module: nn.Module) -> int:
        assert isinstance(module, nn.MultiheadAttention)
        return 0 if module.batch_first else 1
