"""melanoma-siamese: a Siamese (metric-learning) encoder and classifier for melanoma on dermoscopic images."""

__version__ = "0.1.0"
