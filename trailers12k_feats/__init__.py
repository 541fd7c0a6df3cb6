"""trailers12k_feats: multi-label movie-trailer genre classification on cached clip features.

Stage 1 (`extract`) turns videos into per-clip embeddings stored in HDF5 feature caches;
stage 2 (`train`, `reproduce`, `probe`) trains DIViTA heads on those caches and evaluates
the paper's multi-label AP metrics.
"""

__version__ = "0.1.0"

# The ten Trailers12k genres, always in this order (docs/paper.md).
GENRES: tuple[str, ...] = (
    "action", "adventure", "comedy", "crime", "drama",
    "fantasy", "horror", "romance", "sci-fi", "thriller",
)
GENRES_SHORT: tuple[str, ...] = ("act", "adv", "com", "cri", "dra", "fan", "hor", "rom", "sci", "thr")
NUM_GENRES = len(GENRES)
