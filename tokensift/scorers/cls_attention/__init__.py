from tokensift.scorers.cls_attention.model import ClsAttentionConfig, ClsAttentionMethod

__all__ = ["ClsAttentionConfig", "ClsAttentionMethod"]
