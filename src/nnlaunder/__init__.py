"""nnlaunder: do backdoor-based watermarks in image classifiers really prove ownership?

Embed the published watermarks (Zhang et al., Adi et al.), verify ownership claims against a
vanilla-model threshold, and attack them with Neural Network Laundering (Aiken et al. 2020).
"""

__version__ = "0.1.0"
