"""UCE (Gandikota et al. 2023): every cross-attention K/V projection edited in closed form (PAPERS.md §2)."""

from .closed_form import EMPTY_GUIDES, EXPANSIONS, MODES, TOKEN_WINDOWS, UCEConfig, compute_uce  # noqa: F401
