from tokensift.scorers.flowcut.model import FlowCutConfig, FlowCutMethod, flow_score

__all__ = ["FlowCutConfig", "FlowCutMethod", "flow_score"]
