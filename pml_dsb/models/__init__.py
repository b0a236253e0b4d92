"""Embedding networks: a small CNN for digits-LT and torchvision ResNets with a head.

Pretrained weights come only from a local file or the torch hub cache;
nothing is downloaded.
"""
from .build_model import MODEL_NAMES, build_model
from .digits_embedding_net import DigitsEmbeddingNet
from .resnet_embedding import ResNetEmbedding

__all__ = ["DigitsEmbeddingNet", "ResNetEmbedding", "build_model", "MODEL_NAMES"]
