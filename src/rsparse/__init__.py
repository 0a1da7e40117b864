"""rsparse: training-free, rank-aware activation sparsity (R-Sparse) for faster LLM decoding."""
from .apply import dense_view, measure_sparsity, sparsify_
from .errors import RSparseError
from .linear import RSparseLinear, rsparse_linear_ref
from .models import load
from .pipeline import calibrate, load_sparsified, observe, save_plan, search_plan
from .plan import Plan, RSparseConfig

__version__ = "0.1.0"
__all__ = ["RSparseConfig", "RSparseError", "RSparseLinear", "Plan", "calibrate", "dense_view", "load",
           "load_sparsified", "measure_sparsity", "observe", "rsparse_linear_ref", "save_plan", "search_plan", "sparsify_"]
