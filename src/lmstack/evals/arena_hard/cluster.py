"""BERTopic-style topic clusters: embeddings → UMAP → HDBSCAN → c-TF-IDF keywords per cluster.

UMAP brings the 384-d sentence embeddings down to a few dimensions where density is meaningful; HDBSCAN finds
clusters of any shape and leaves outliers unassigned (label −1) instead of forcing them into a topic; c-TF-IDF
treats each cluster as one document and ranks the words that are frequent in it but rare across clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmstack.errors import LmstackError


@dataclass
class TopicConfig:
    umap_dims: int = 5
    umap_neighbors: int = 15
    min_cluster_size: int = 15
    min_samples: int | None = None
    num_keywords: int = 8
    seed: int = 0


class TopicModel:
    """`fit(embeddings, docs)` sets `labels_` ([N], −1 = outlier), `reduced_` ([N, umap_dims]), `keywords_`."""

    def __init__(self, cfg: TopicConfig | None = None) -> None:
        self.cfg = cfg or TopicConfig()

    def fit(self, embeddings: np.ndarray, docs: list[str]) -> TopicModel:
        from sklearn.cluster import HDBSCAN
        from umap import UMAP

        if embeddings.ndim != 2 or len(embeddings) != len(docs):
            raise LmstackError(f"need one embedding row per document; got {embeddings.shape} for {len(docs)} docs")
        if len(docs) < 2 * self.cfg.min_cluster_size:
            raise LmstackError(f"{len(docs)} prompts are too few for clusters of at least "
                               f"{self.cfg.min_cluster_size}; use more prompts or a smaller --min-cluster-size")
        reducer = UMAP(n_components=self.cfg.umap_dims, n_neighbors=self.cfg.umap_neighbors, min_dist=0.0,
                       metric="cosine", random_state=self.cfg.seed, n_jobs=1)  # seeded UMAP is serial anyway
        self.reduced_ = reducer.fit_transform(embeddings)  # [N, umap_dims]
        clusterer = HDBSCAN(min_cluster_size=self.cfg.min_cluster_size, min_samples=self.cfg.min_samples,
                            copy=True)
        self.labels_ = clusterer.fit_predict(self.reduced_)  # [N]
        self.keywords_ = ctfidf_keywords(docs, self.labels_, self.cfg.num_keywords)
        return self

    def fit_predict(self, embeddings: np.ndarray, docs: list[str]) -> np.ndarray:
        return self.fit(embeddings, docs).labels_


def ctfidf_keywords(docs: list[str], labels: np.ndarray, k: int) -> dict[int, list[str]]:
    """Top-k c-TF-IDF words of each cluster: tf(t, c) / |c| · log(1 + mean words per cluster / f(t))."""
    from sklearn.feature_extraction.text import CountVectorizer

    clusters = sorted(int(c) for c in set(labels.tolist()) if c != -1)
    if not clusters:
        return {}
    joined = [" ".join(d for d, lab in zip(docs, labels, strict=True) if lab == c) for c in clusters]
    vectorizer = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9+#.-]{1,}\b")
    counts = vectorizer.fit_transform(joined).toarray().astype(float)  # [clusters, vocab]
    tf = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    idf = np.log1p(counts.sum(axis=1).mean() / np.maximum(counts.sum(axis=0), 1.0))  # [vocab]
    scores = tf * idf
    vocab = vectorizer.get_feature_names_out()
    return {c: [str(vocab[j]) for j in np.argsort(-scores[i])[:k] if scores[i, j] > 0]
            for i, c in enumerate(clusters)}
