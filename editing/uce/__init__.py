"""UCE (Gandikota et al. 2023): every cross-attention K/V projection edited in closed form,
and the paper's closed-loop debias procedure around it (`debias.py`)."""

from .closed_form import compute_uce
from .config import DebiasConfig, EMPTY_GUIDES, EXPANSIONS, MODES, TOKEN_WINDOWS, UCEConfig
from .debias import debias_uce
