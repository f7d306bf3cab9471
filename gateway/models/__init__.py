"""Pure decisions about models: what a request needs and which variant serves it."""

from gateway.models.estimator import TokenEstimator
from gateway.models.needs import BOUND_SLACK, Needs, PromptShape, Room, byte_bound, token_floor
from gateway.models.selector import ModelSelector, RunningEngine, Selection

__all__ = [
    "BOUND_SLACK",
    "ModelSelector",
    "Needs",
    "PromptShape",
    "Room",
    "RunningEngine",
    "Selection",
    "TokenEstimator",
    "byte_bound",
    "token_floor",
]
