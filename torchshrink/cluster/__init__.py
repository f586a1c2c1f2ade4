"""Weight sharing (k-means clustering) and entropy coding of the codes: Deep Compression's steps 2-3."""

from torchshrink.cluster.entropy import ENTROPY
from torchshrink.cluster.kmeans import ClusteredLayer, KMeansConfig, kmeans_1d

__all__ = ["ENTROPY", "ClusteredLayer", "KMeansConfig", "kmeans_1d"]
