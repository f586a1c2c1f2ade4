"""Low-rank factorization: SVD of Linear layers, Tucker-2 / CP / depthwise-separable replacement
of convolutions, rank selection (energy, ratio, VBMF, global MAC / weight budget), and block-wise
refitting of the factors to the original model's outputs."""

from torchshrink.lowrank.budget import BudgetConfig
from torchshrink.lowrank.cp import CPConfig, factorize_cp
from torchshrink.lowrank.rank import energy_rank, tail_energy, vbmf_rank
from torchshrink.lowrank.refit import RefitSettings, refit, refit_blocks
from torchshrink.lowrank.separable import SeparableConfig, factorize_separable
from torchshrink.lowrank.svd import SVDConfig, factorize_linear, fused_linear, svd_factors
from torchshrink.lowrank.tucker import Tucker2Config, dense_weight, factorize_tucker2, fused_conv

__all__ = [
    "BudgetConfig", "CPConfig", "RefitSettings", "SVDConfig", "SeparableConfig", "Tucker2Config", "dense_weight", "energy_rank", "factorize_cp",
    "factorize_linear", "factorize_separable", "factorize_tucker2", "fused_conv", "fused_linear", "refit", "refit_blocks",
    "svd_factors", "tail_energy", "vbmf_rank",
]
