"""AutoML search: per-layer compression settings under a size / latency / quality budget, with
costs measured on the machine it runs on (see search.search)."""

from torchshrink.search.budget import Budget, parse_budget
from torchshrink.search.evaluate import Evaluator, Point
from torchshrink.search.greedy import greedy
from torchshrink.search.profile import LayerProfile, plot_sensitivity, profile_layers
from torchshrink.search.search import InfeasibleBudgetError, SearchResult, pareto_front, search
from torchshrink.search.space import SearchSpace, assignment_to_recipe, available_options, build_space

__all__ = [
    "Budget", "Evaluator", "InfeasibleBudgetError", "LayerProfile", "Point", "SearchResult", "SearchSpace",
    "assignment_to_recipe", "available_options", "build_space", "greedy", "pareto_front", "parse_budget",
    "plot_sensitivity", "profile_layers", "search",
]
