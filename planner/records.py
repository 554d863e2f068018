"""The pipeline's records (defined in passes/records.py, the bottom layer; re-exported here)."""
from passes.records import (  # noqa: F401
    EXACTNESS,
    MASK_KINDS,
    POLICIES,
    AttentionSite,
    Candidate,
    Crossover,
    MaskSpec,
    Plan,
    SiteDecision,
    Size,
)
