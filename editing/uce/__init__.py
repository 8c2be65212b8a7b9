"""UCE (Gandikota et al. 2023): every cross-attention K/V projection edited in closed form,
and the paper's closed-loop debias procedure around it (`debias.py`)."""

from .closed_form import EMPTY_GUIDES, EXPANSIONS, MODES, TOKEN_WINDOWS, UCEConfig, compute_uce  # noqa: F401
from .debias import DebiasConfig, debias_uce  # noqa: F401
