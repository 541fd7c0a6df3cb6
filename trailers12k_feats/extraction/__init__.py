"""Stage 1: videos -> shots -> clips -> frozen backbones -> per-clip embeddings in the feature cache.

`video` decodes and cuts shots and clips, `backbones` is the model registry, `inputs` finds
the videos, `clipstream` turns them into preprocessed clips in worker processes, `extract`
runs the models over them and `store` writes finished trailers crash-safely.
"""
