"""Stage 2: DIViTA heads trained and evaluated on cached clip features.

`data` reads the metadata and serves windows and snippets of cached trailers, `heads` builds
the models, `train` runs the protocol, `metrics` scores it, `probe` is the linear probe,
`reproduce` runs Table 6 and `tables` collects and formats results beside the paper's.
"""
