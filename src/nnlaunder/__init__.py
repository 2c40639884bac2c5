"""nnlaunder: do backdoor-based watermarks in image classifiers really prove ownership?

Embed the published watermarks (Zhang et al., Adi et al.), verify ownership claims with thresholds of
a measured false-positive rate, attack them with Neural Network Laundering (Aiken et al. 2020) and the
strongest known removal attacks, and test whether the owner can restore them. The public API
(`nnlaunder.api`, docs/api.md):

    import nnlaunder as nl
    model, meta = nl.load_model("models/mnist/zhang-content")
"""

from .api import (
    attack,
    attacker_subset,
    audit,
    embed,
    launder,
    load_data,
    load_model,
    model_meta,
    neural_cleanse,
    save_model,
    threshold,
    train_clean,
    verify,
    watermark,
)

__version__ = "0.1.0"
__all__ = ["attack", "attacker_subset", "audit", "embed", "launder", "load_data", "load_model", "model_meta",
           "neural_cleanse", "save_model", "threshold", "train_clean", "verify", "watermark"]
