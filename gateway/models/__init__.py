"""Pure decisions about models: what a request needs and which variant serves it."""

from gateway.models.estimator import TokenEstimator
from gateway.models.needs import Needs, PromptShape
from gateway.models.selector import ModelSelector, RunningEngine, Selection

__all__ = ["ModelSelector", "Needs", "PromptShape", "RunningEngine", "Selection", "TokenEstimator"]
